// The demo page: a grpc-web client of deskgen.v1 on the origin that served it.

import type { MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { TaskStatus } from "./gen/deskgen/v1/common_pb";
import { Generate, type GenerateRequestSchema } from "./gen/deskgen/v1/generate_pb";
import { Info, type InfoResponse } from "./gen/deskgen/v1/info_pb";
import { Result, type Recommendation, type TaskResult } from "./gen/deskgen/v1/result_pb";
import { BadRequestSchema, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb";

const KEY_STORAGE = "deskgen.apiKey";

function byId<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`#${id} is missing from the page`);
  return found as T;
}

const form = byId<HTMLFormElement>("generate-form");
const imageUrl = byId<HTMLInputElement>("image-url");
const promptText = byId<HTMLTextAreaElement>("prompt");
const scheduler = byId<HTMLSelectElement>("scheduler");
const steps = byId<HTMLInputElement>("steps");
const loraField = byId<HTMLElement>("lora-field");
const lora = byId<HTMLSelectElement>("lora");
const apiKey = byId<HTMLInputElement>("api-key");
const submit = byId<HTMLButtonElement>("submit");
const errorBox = byId<HTMLElement>("error");
const progressSection = byId<HTMLElement>("progress-section");
const progressBar = byId<HTMLProgressElement>("progress");
const progressText = byId<HTMLElement>("progress-text");
const resultSection = byId<HTMLElement>("result");
const resultHeading = byId<HTMLElement>("result-heading");
const resultNote = byId<HTMLElement>("result-note");
const shopping = byId<HTMLElement>("shopping");

const withApiKey: Interceptor = (next) => (request) => {
  const key = apiKey.value.trim();
  if (key) request.header.set("authorization", `Bearer ${key}`);
  return next(request);
};
const transport = createGrpcWebTransport({ baseUrl: location.origin, interceptors: [withApiKey] });
const generateClient = createClient(Generate, transport);
const resultClient = createClient(Result, transport);
const infoClient = createClient(Info, transport);

/** What to tell the person when something went wrong. */
interface Problem {
  summary: string;
  details: string[];
  code?: string;
  fields?: string[];
}

const STAGES: Record<string, string> = {
  queued: "Waiting in the queue",
  fetch: "Downloading your photo",
  vision: "Looking at your desk",
  caption: "Describing the scene",
  prompt: "Writing the prompt",
  diffusion: "Drawing the new setup",
  upload: "Saving the image",
  shopping: "Finding shopping picks",
};

const FAILURES: Record<string, string> = {
  INVALID_INPUT: "The request was not accepted.",
  IMAGE_FETCH_FAILED: "The photo could not be downloaded. Check that its address is public and points to an image.",
  INVALID_IMAGE: "The file at that address is not an image that can be read (JPEG, PNG or WebP).",
  MODEL_ERROR: "The image model failed on this request.",
  S3_UPLOAD_FAILED: "The generated image could not be saved.",
  SHOPPING_FAILED: "The shopping search failed.",
  CANCELED: "The task was canceled.",
  TIMEOUT: "The task took too long and was stopped.",
};

function restoreApiKey(): void {
  try {
    apiKey.value = sessionStorage.getItem(KEY_STORAGE) ?? "";
  } catch {
    // Storage may be disabled; the field then simply starts empty.
  }
  apiKey.addEventListener("input", () => {
    try {
      const key = apiKey.value.trim();
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch {
      // Not remembered across reloads, but still sent.
    }
  });
}

function fillOptions(about: InfoResponse): void {
  const defaultScheduler = about.defaults?.scheduler ?? "";
  for (const name of about.schedulers) {
    scheduler.add(new Option(name === defaultScheduler ? `${name} (default)` : name, name));
  }
  if (about.defaults) steps.placeholder = `${about.defaults.numInferenceSteps} (default)`;
  if (about.limits) steps.max = String(about.limits.maxSteps);
  for (const adapter of about.loras) lora.add(new Option(adapter.name, adapter.name));
  loraField.hidden = about.loras.length === 0;
}

function readForm(): MessageInitShape<typeof GenerateRequestSchema> {
  const request: MessageInitShape<typeof GenerateRequestSchema> = {};
  const url = imageUrl.value.trim();
  if (url) request.initialImageUrl = url;
  // Without a photo the prompt is required; send it even when blank so the server says so.
  if (promptText.value.trim() || !url) request.prompt = promptText.value;
  if (scheduler.value) request.scheduler = scheduler.value;
  if (steps.value) request.numInferenceSteps = Number(steps.value);
  if (lora.value) request.loras = [{ name: lora.value, weight: 1 }];
  return request;
}

function isFinal(status: TaskStatus): boolean {
  return status === TaskStatus.DONE || status === TaskStatus.FAILED || status === TaskStatus.CANCELED;
}

function showProgress(update: Pick<TaskResult, "status" | "progress">): void {
  progressSection.hidden = false;
  const progress = update.progress;
  if (update.status === TaskStatus.QUEUED || !progress) {
    progressBar.removeAttribute("value");
    progressText.textContent = update.status === TaskStatus.QUEUED ? "Waiting in the queue…" : "Starting…";
    return;
  }
  const label = STAGES[progress.stage] ?? progress.stage;
  if (progress.steps > 0) {
    progressBar.value = progress.step / progress.steps;
    progressText.textContent = `${label}: step ${progress.step} of ${progress.steps}`;
  } else {
    progressBar.removeAttribute("value");
    progressText.textContent = `${label}…`;
  }
}

/** Follows the task over the server stream; polls if the stream ends early. */
async function follow(taskId: string): Promise<TaskResult> {
  let last: TaskResult | undefined;
  try {
    for await (const update of resultClient.watchResult({ taskId })) {
      last = update;
      showProgress(update);
    }
  } catch (err) {
    // A proxy may cut long streams; once the task is known, polling finishes the job.
    if (!last) throw err;
  }
  while (!last || !isFinal(last.status)) {
    await new Promise((resolve) => setTimeout(resolve, 1000));
    last = await resultClient.getResult({ taskId });
    showProgress(last);
  }
  return last;
}

function isWebUrl(url: string | undefined): url is string {
  return url !== undefined && /^https?:\/\//i.test(url);
}

function showImage(imageId: string, url: string | undefined, missing: string): void {
  const image = byId<HTMLImageElement>(imageId);
  const figure = image.parentElement as HTMLElement;
  figure.querySelector(".placeholder")?.remove();
  if (isWebUrl(url)) {
    image.hidden = false;
    image.src = url;
    return;
  }
  image.hidden = true;
  image.removeAttribute("src");
  const placeholder = document.createElement("p");
  placeholder.className = "placeholder";
  placeholder.textContent = missing;
  figure.insertBefore(placeholder, image);
}

function shoppingCard(item: Recommendation["items"][number]): HTMLLIElement {
  const card = document.createElement("li");
  card.className = "card";
  if (isWebUrl(item.image)) {
    const image = document.createElement("img");
    image.src = item.image;
    image.alt = "";
    image.loading = "lazy";
    card.append(image);
  }
  const title = document.createElement(isWebUrl(item.link) ? "a" : "span");
  title.textContent = item.title;
  if (title instanceof HTMLAnchorElement) {
    title.href = item.link;
    title.target = "_blank";
    title.rel = "noopener noreferrer";
  }
  const price = document.createElement("span");
  price.className = "price";
  price.textContent = item.price;
  const mall = document.createElement("span");
  mall.className = "mall";
  mall.textContent = item.mall;
  card.append(title, price, mall);
  return card;
}

function showShopping(recommendations: Recommendation[]): void {
  shopping.replaceChildren();
  const withItems = recommendations.filter((r) => r.items.length > 0);
  if (withItems.length === 0) {
    const none = document.createElement("p");
    none.textContent = "No shopping picks this time.";
    shopping.append(none);
    return;
  }
  for (const recommendation of withItems) {
    const group = document.createElement("section");
    group.className = "category";
    const heading = document.createElement("h3");
    heading.textContent = recommendation.displayName || recommendation.category;
    const cards = document.createElement("ul");
    cards.className = "cards";
    cards.append(...recommendation.items.map(shoppingCard));
    group.append(heading, cards);
    shopping.append(group);
  }
}

function showResult(result: TaskResult): void {
  const initial = result.initialImageUrl;
  showImage(
    "original-image",
    initial,
    initial ? `Stored at ${initial} (not viewable in the browser).` : "No photo: generated from the text alone.",
  );
  showImage("generated-image", result.processedImageUrl, "No new image was generated.");
  const notes: string[] = [];
  if (result.isDesk === false) {
    notes.push("This photo does not look like a desk, so no new setup was generated. Here are shopping picks for what was found in it.");
  } else if (!result.processedImageUrl) {
    notes.push("The new setup could not be generated. Here are shopping picks anyway.");
  }
  notes.push(...result.warnings);
  resultNote.textContent = notes.join(" ");
  resultNote.hidden = notes.length === 0;
  showShopping(result.recommendations);
  resultSection.hidden = false;
  resultHeading.focus();
}

function fieldViolations(err: ConnectError): { field: string; description: string }[] {
  return err.findDetails(BadRequestSchema).flatMap((request) => request.fieldViolations);
}

function describeError(reason: unknown): Problem {
  const err = ConnectError.from(reason);
  const code = err.findDetails(ErrorInfoSchema)[0]?.reason;
  const message = err.rawMessage;
  switch (err.code) {
    case Code.Unauthenticated:
      return { summary: "The API key was not accepted. Enter a valid key and try again.", details: [], code, fields: ["api_key"] };
    case Code.InvalidArgument: {
      const violations = fieldViolations(err);
      return {
        summary: "Please check the request.",
        details: violations.length > 0 ? violations.map((v) => v.description) : [message],
        code,
        fields: violations.map((v) => v.field),
      };
    }
    case Code.ResourceExhausted:
      return { summary: "The service is busy right now. Try again in a minute.", details: [message], code };
    case Code.Unavailable:
      return { summary: "The service is starting or cannot be reached. Try again shortly.", details: [message], code };
    case Code.NotFound:
      return { summary: "That task is no longer known to the service.", details: [message], code };
    default:
      return { summary: message || "Something went wrong.", details: [], code };
  }
}

function taskFailure(result: TaskResult): Problem {
  const code = result.errorCode ?? (result.status === TaskStatus.CANCELED ? "CANCELED" : undefined);
  return {
    summary: (code && FAILURES[code]) || "The task failed.",
    details: result.message ? [result.message] : [],
    code,
  };
}

function clearProblem(): void {
  errorBox.hidden = true;
  errorBox.replaceChildren();
  for (const field of form.querySelectorAll("[aria-invalid]")) field.removeAttribute("aria-invalid");
}

function showProblem(problem: Problem): void {
  const summary = document.createElement("p");
  summary.textContent = problem.summary;
  errorBox.replaceChildren(summary);
  if (problem.details.length > 0) {
    const list = document.createElement("ul");
    for (const detail of problem.details) {
      const line = document.createElement("li");
      line.textContent = detail;
      list.append(line);
    }
    errorBox.append(list);
  }
  if (problem.code) {
    const code = document.createElement("p");
    code.className = "hint";
    code.textContent = `Error code: ${problem.code}`;
    errorBox.append(code);
  }
  errorBox.hidden = false;
  for (const name of problem.fields ?? []) {
    const field = form.elements.namedItem(name);
    if (field instanceof HTMLElement) field.setAttribute("aria-invalid", "true");
  }
}

async function run(): Promise<void> {
  clearProblem();
  resultSection.hidden = true;
  submit.disabled = true;
  form.setAttribute("aria-busy", "true");
  try {
    const submitted = await generateClient.generate(readForm());
    showProgress({ status: TaskStatus.QUEUED });
    const result = await follow(submitted.taskId);
    if (result.status === TaskStatus.DONE) showResult(result);
    else showProblem(taskFailure(result));
  } catch (err) {
    showProblem(describeError(err));
  } finally {
    progressSection.hidden = true;
    submit.disabled = false;
    form.removeAttribute("aria-busy");
  }
}

restoreApiKey();
form.addEventListener("submit", (event) => {
  event.preventDefault();
  void run();
});
infoClient.getInfo({}).then(fillOptions, (err: unknown) => showProblem(describeError(err)));
