// The demo page: a grpc-web client of deskgen.v1 on the origin that served it.

import type { MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { TaskStatus } from "./gen/deskgen/v1/common_pb";
import { Generate, type GenerateRequestSchema } from "./gen/deskgen/v1/generate_pb";
import { Info, type InfoResponse } from "./gen/deskgen/v1/info_pb";
import { type DetectedItem, Result, type Recommendation, type TaskResult } from "./gen/deskgen/v1/result_pb";
import { BadRequestSchema, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb";

const KEY_STORAGE = "deskgen.apiKey";
/** Photos whose longer side is bigger are made this size before they are sent. */
const MAX_SIDE = 2048;
/** Types a photo within MAX_SIDE is sent in as it is; others are re-encoded as JPEG. */
const SENT_AS_IS = ["image/jpeg", "image/png", "image/webp"];

function byId<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`#${id} is missing from the page`);
  return found as T;
}

const form = byId<HTMLFormElement>("generate-form");
const photoFile = byId<HTMLInputElement>("photo-file");
const dropZone = byId<HTMLElement>("drop-zone");
const preview = byId<HTMLElement>("photo-preview");
const previewImage = byId<HTMLImageElement>("photo-preview-image");
const previewName = byId<HTMLElement>("photo-preview-name");
const photoClear = byId<HTMLButtonElement>("photo-clear");
const imageUrl = byId<HTMLInputElement>("image-url");
const promptText = byId<HTMLTextAreaElement>("prompt");
const scheduler = byId<HTMLSelectElement>("scheduler");
const steps = byId<HTMLInputElement>("steps");
const images = byId<HTMLInputElement>("images");
const priority = byId<HTMLSelectElement>("priority");
const loraField = byId<HTMLElement>("lora-field");
const lora = byId<HTMLSelectElement>("lora");
const apiKey = byId<HTMLInputElement>("api-key");
const submit = byId<HTMLButtonElement>("submit");
const errorBox = byId<HTMLElement>("error");
const progressSection = byId<HTMLElement>("progress-section");
const progressBar = byId<HTMLProgressElement>("progress");
const progressText = byId<HTMLElement>("progress-text");
const progressPreview = byId<HTMLImageElement>("progress-preview");
const resultSection = byId<HTMLElement>("result");
const resultHeading = byId<HTMLElement>("result-heading");
const resultNote = byId<HTMLElement>("result-note");
const boxes = byId<HTMLElement>("boxes");
const deskVerdict = byId<HTMLElement>("desk-verdict");
const caption = byId<HTMLElement>("caption");
const control = byId<HTMLElement>("control");
const noItems = byId<HTMLElement>("no-items");
const detectedItems = byId<HTMLElement>("detected-items");
const textHeading = byId<HTMLElement>("text-heading");
const detectedText = byId<HTMLElement>("detected-text");
const keepForm = byId<HTMLFormElement>("keep-form");
const keepItems = byId<HTMLElement>("keep-items");
const keepRedo = byId<HTMLButtonElement>("keep-redo");
const maskFigure = byId<HTMLElement>("mask");
const maskImage = byId<HTMLImageElement>("mask-image");
const warningsBlock = byId<HTMLElement>("warnings-block");
const warnings = byId<HTMLElement>("warnings");
const seen = byId<HTMLElement>("seen");
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

/** What POST /v1/uploads answers. */
interface Upload {
  key: string;
  url: string;
  content_type: string;
  width: number;
  height: number;
  bytes: number;
  sha256: string;
}

/** The photo chosen on the page, and its upload once sent: later generations reuse it. */
let chosen: { file: File; previewUrl: string; upload?: Upload } | undefined;

function choosePhoto(file: File): void {
  clearProblem();
  forgetPhoto();
  if (!file.type.startsWith("image/")) {
    showProblem({ summary: `${file.name || "That file"} is not an image. Choose a JPEG, PNG or WebP photo.`, details: [], fields: ["photo"] });
    return;
  }
  chosen = { file, previewUrl: URL.createObjectURL(file) };
  previewImage.src = chosen.previewUrl;
  previewName.textContent = `${file.name || "Pasted photo"} (${formatBytes(file.size)})`;
  preview.hidden = false;
}

function forgetPhoto(): void {
  if (chosen) URL.revokeObjectURL(chosen.previewUrl);
  chosen = undefined;
  previewImage.removeAttribute("src");
  preview.hidden = true;
  photoFile.value = "";
}

function formatBytes(bytes: number): string {
  if (bytes < 1024) return `${bytes} bytes`;
  if (bytes < 1024 * 1024) return `${Math.round(bytes / 1024)} KB`;
  return `${(bytes / (1024 * 1024)).toFixed(1)} MB`;
}

/** The first image file in a drop or a paste. */
function imageFile(data: DataTransfer | null): File | undefined {
  return [...(data?.files ?? [])].find((file) => file.type.startsWith("image/")) ?? data?.files[0];
}

function watchPhotoInputs(): void {
  photoFile.addEventListener("change", () => {
    const file = photoFile.files?.[0];
    if (file) choosePhoto(file);
  });
  photoClear.addEventListener("click", () => {
    forgetPhoto();
    photoFile.focus();
  });
  dropZone.addEventListener("dragover", (event) => {
    event.preventDefault();
    dropZone.classList.add("dragging");
  });
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("dragging");
    const file = imageFile(event.dataTransfer);
    if (file) choosePhoto(file);
  });
  // Text pasted into a field stays text; only a pasted picture becomes the photo.
  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData?.files ?? [])].find((f) => f.type.startsWith("image/"));
    if (!file) return;
    event.preventDefault();
    choosePhoto(file);
  });
}

/**
 * The photo as it will be sent: upright (EXIF orientation applied) and at most MAX_SIDE on its
 * longer side, as JPEG; a photo already within that size and in a type the server reads goes as
 * it is (the server turns it upright itself). A file the browser cannot decode also goes as it
 * is, so that the server says what is wrong with it.
 */
async function preparePhoto(file: File): Promise<Blob> {
  let bitmap: ImageBitmap;
  try {
    bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch {
    return file;
  }
  try {
    const longer = Math.max(bitmap.width, bitmap.height);
    if (longer <= MAX_SIDE && SENT_AS_IS.includes(file.type)) return file;
    const scale = Math.min(1, MAX_SIDE / longer);
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    const context = canvas.getContext("2d");
    if (!context) return file;
    // JPEG has no transparency: see-through parts become white, not black.
    context.fillStyle = "#fff";
    context.fillRect(0, 0, canvas.width, canvas.height);
    context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    return await new Promise<Blob>((resolve, reject) => {
      canvas.toBlob(
        (blob) => (blob ? resolve(blob) : reject(new Error("The photo could not be made smaller in this browser."))),
        "image/jpeg",
        0.9,
      );
    });
  } finally {
    bitmap.close();
  }
}

/** A failed upload, said as the page says other problems. */
class UploadError extends Error {
  constructor(readonly problem: Problem) {
    super(problem.summary);
  }
}

function uploadProblem(status: number, body: unknown): Problem {
  const answer = (typeof body === "object" && body !== null ? body : {}) as Record<string, unknown>;
  const message = typeof answer.message === "string" ? answer.message : typeof answer.detail === "string" ? answer.detail : "";
  const code = typeof answer.error_code === "string" ? answer.error_code : undefined;
  const details = message ? [message] : [];
  if (status === 401) return { summary: "The API key was not accepted. Enter a valid key and try again.", details, code, fields: ["api_key"] };
  if (status === 413) return { summary: "The photo is too large to send.", details, code, fields: ["photo"] };
  if (status === 400 || status === 422) return { summary: "The photo was not accepted.", details, code, fields: ["photo"] };
  if (status === 429 || status === 503) return { summary: "The service is busy or starting. Try again shortly.", details, code };
  return { summary: `The photo could not be sent (HTTP ${status}).`, details, code };
}

/**
 * Stores the photo with POST /v1/uploads and returns what the server answers; its `url` is then
 * the generation's initial_image_url. XMLHttpRequest, not fetch or grpc-web, because only XHR
 * reports upload progress; and a stored original can be named by several generations, so the
 * photo is sent once however often the person presses Generate.
 */
function sendPhoto(photo: Blob, onProgress: (fraction: number) => void): Promise<Upload> {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", "/v1/uploads");
    const key = apiKey.value.trim();
    if (key) request.setRequestHeader("authorization", `Bearer ${key}`);
    request.responseType = "json";
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    request.addEventListener("load", () => {
      if (request.status === 201) resolve(request.response as Upload);
      else reject(new UploadError(uploadProblem(request.status, request.response)));
    });
    request.addEventListener("error", () => {
      reject(new UploadError({ summary: "The photo could not be sent: the service cannot be reached.", details: [] }));
    });
    request.send(photo);
  });
}

/** The URL of the chosen photo on the server, sending it first if it has not been sent yet. */
async function uploadedPhotoUrl(photo: NonNullable<typeof chosen>): Promise<string> {
  if (photo.upload) return photo.upload.url;
  showUploadProgress(0);
  const prepared = await preparePhoto(photo.file);
  photo.upload = await sendPhoto(prepared, showUploadProgress);
  return photo.upload.url;
}

function showUploadProgress(fraction: number): void {
  progressSection.hidden = false;
  progressBar.value = fraction;
  progressText.textContent = `Sending your photo: ${Math.round(fraction * 100)}%`;
}

function fillOptions(about: InfoResponse): void {
  const defaultScheduler = about.defaults?.scheduler ?? "";
  for (const name of about.schedulers) {
    scheduler.add(new Option(name === defaultScheduler ? `${name} (default)` : name, name));
  }
  if (about.defaults) steps.placeholder = `${about.defaults.numInferenceSteps} (default)`;
  if (about.limits) steps.max = String(about.limits.maxSteps);
  if (about.defaults) images.placeholder = `${about.defaults.numImages} (default)`;
  if (about.limits) images.max = String(about.limits.maxImages);
  for (const adapter of about.loras) lora.add(new Option(adapter.name, adapter.name));
  loraField.hidden = about.loras.length === 0;
}

function readForm(photoUrl: string | undefined): MessageInitShape<typeof GenerateRequestSchema> {
  const request: MessageInitShape<typeof GenerateRequestSchema> = {};
  const url = photoUrl ?? imageUrl.value.trim();
  if (url) request.initialImageUrl = url;
  // Without a photo the prompt is required; send it even when blank so the server says so.
  if (promptText.value.trim() || !url) request.prompt = promptText.value;
  if (scheduler.value) request.scheduler = scheduler.value;
  if (steps.value) request.numInferenceSteps = Number(steps.value);
  if (images.value) request.numImages = Number(images.value);
  if (priority.value) request.priority = priority.value;
  if (lora.value) request.loras = [{ name: lora.value, weight: 1 }];
  return request;
}

function isFinal(status: TaskStatus): boolean {
  return status === TaskStatus.DONE || status === TaskStatus.FAILED || status === TaskStatus.CANCELED;
}

function showProgress(update: Pick<TaskResult, "status" | "progress" | "queuePosition">): void {
  progressSection.hidden = false;
  const progress = update.progress;
  if (update.status === TaskStatus.QUEUED || !progress) {
    progressBar.removeAttribute("value");
    progressText.textContent = update.status === TaskStatus.QUEUED ? queuedText(update.queuePosition) : "Starting…";
    return;
  }
  if (progress.preview.length > 0) showPreview(progress.preview);
  const label = STAGES[progress.stage] ?? progress.stage;
  if (progress.steps > 0) {
    progressBar.value = progress.step / progress.steps;
    progressText.textContent = `${label}: step ${progress.step} of ${progress.steps}`;
  } else {
    progressBar.removeAttribute("value");
    progressText.textContent = `${label}…`;
  }
}

/** What a queued task's line says: its place when the server tells it. */
function queuedText(position: number | undefined): string {
  if (position === undefined) return "Waiting in the queue…";
  if (position === 1) return "Waiting in the queue: next to start…";
  return `Waiting in the queue: ${position - 1} tasks start before this one…`;
}

/** Shows a JPEG preview of the image being drawn in place of the one before. */
function showPreview(jpeg: Uint8Array): void {
  const previous = progressPreview.src;
  progressPreview.src = URL.createObjectURL(new Blob([new Uint8Array(jpeg)], { type: "image/jpeg" }));
  progressPreview.hidden = false;
  if (previous) URL.revokeObjectURL(previous);
}

function clearPreview(): void {
  if (progressPreview.src) URL.revokeObjectURL(progressPreview.src);
  progressPreview.removeAttribute("src");
  progressPreview.hidden = true;
}

/** Follows the task over the server stream, with previews; polls if the stream ends early. */
async function follow(taskId: string): Promise<TaskResult> {
  let last: TaskResult | undefined;
  try {
    for await (const update of resultClient.watchResult({ taskId, previews: true })) {
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

/** Shows the image at `url` in its figure, or says why there is none; whether it is shown. */
function showImage(imageId: string, url: string | undefined, missing: string): boolean {
  const image = byId<HTMLImageElement>(imageId);
  const figure = image.closest("figure") as HTMLElement;
  figure.querySelector(".placeholder")?.remove();
  if (isWebUrl(url)) {
    image.hidden = false;
    image.src = url;
    return true;
  }
  image.hidden = true;
  image.removeAttribute("src");
  const placeholder = document.createElement("p");
  placeholder.className = "placeholder";
  placeholder.textContent = missing;
  figure.prepend(placeholder);
  return false;
}

/** Shows the first generated image in its figure and each further one in a figure beside it. */
function showGenerated(urls: string[]): void {
  for (const figure of document.querySelectorAll("figure.more-generated")) figure.remove();
  showImage("generated-image", urls[0], "No new image was generated.");
  let previous = byId<HTMLElement>("generated");
  urls.slice(1).forEach((url, index) => {
    const figure = document.createElement("figure");
    figure.className = "more-generated";
    const image = document.createElement("img");
    image.alt = `Generated desk setup ${index + 2}`;
    image.src = url;
    const caption = document.createElement("figcaption");
    caption.textContent = `Generated ${index + 2}`;
    figure.append(image, caption);
    previous.after(figure);
    previous = figure;
  });
}

function percent(score: number): string {
  return `${Math.round(score * 100)}%`;
}

/**
 * Draws the detected items over the original. Boxes are fractions of the upright photo's width
 * and height (the stored original is upright, and browsers show a linked photo upright too), so
 * as percentages of the frame they follow the image at any displayed size.
 */
function drawBoxes(items: DetectedItem[]): void {
  boxes.replaceChildren(
    ...items.flatMap((item) => {
      if (!item.box) return [];
      const { xMin, yMin, xMax, yMax } = item.box;
      const box = document.createElement("div");
      box.className = "box";
      box.style.left = `${xMin * 100}%`;
      box.style.top = `${yMin * 100}%`;
      box.style.width = `${(xMax - xMin) * 100}%`;
      box.style.height = `${(yMax - yMin) * 100}%`;
      const label = document.createElement("span");
      label.className = "box-label";
      label.textContent = `${item.label} ${percent(item.score)}`;
      box.append(label);
      return [box];
    }),
  );
}

/** The verdict, caption, items and warnings the pipeline reported, in words. */
function showSeen(result: TaskResult): void {
  seen.hidden = result.isDesk === undefined && !result.caption && result.detectedItems.length === 0;
  deskVerdict.textContent = result.isDesk === undefined ? "Not checked" : result.isDesk ? "Yes" : "No";
  caption.textContent = result.caption || "None";
  control.textContent =
    result.control.map((unit) => `${unit.type} ControlNet at ${unit.scale.toFixed(2)}`).join(", ") ||
    "Nothing: plain image-to-image";
  detectedItems.replaceChildren(
    ...result.detectedItems.map((item) => {
      const line = document.createElement("li");
      line.textContent = `${item.label} (${percent(item.score)} sure)`;
      return line;
    }),
  );
  noItems.hidden = result.detectedItems.length > 0;
  detectedText.replaceChildren(
    ...result.detectedText.map((read) => {
      const line = document.createElement("li");
      line.textContent = `“${read.text}”${read.brand ? `, ${read.brand}` : ""} (${percent(read.score)} sure)`;
      return line;
    }),
  );
  textHeading.hidden = detectedText.hidden = result.detectedText.length === 0;
  warnings.replaceChildren(
    ...result.warnings.map((text) => {
      const line = document.createElement("li");
      line.textContent = text;
      return line;
    }),
  );
  warningsBlock.hidden = result.warnings.length === 0;
}

/** The photo of the last result and its detected labels, offered as items to keep in a redo. */
let lastPhotoUrl: string | undefined;

function showKeepChoice(result: TaskResult): void {
  const labels = [...new Set(result.detectedItems.map((item) => item.label))];
  lastPhotoUrl = result.initialImageUrl;
  keepForm.hidden = !lastPhotoUrl || labels.length === 0 || result.isDesk === false;
  keepItems.replaceChildren(
    ...labels.map((label) => {
      const choice = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.name = "keep";
      box.value = label;
      choice.append(box, ` ${label}`);
      return choice;
    }),
  );
}

/** The mask the image was made with, beside it; hidden when there was none. */
function showMask(url: string | undefined): void {
  maskFigure.hidden = !isWebUrl(url);
  if (isWebUrl(url)) maskImage.src = url;
  else maskImage.removeAttribute("src");
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
  const original = showImage(
    "original-image",
    initial,
    initial ? `Stored at ${initial} (not viewable in the browser).` : "No photo: generated from the text alone.",
  );
  drawBoxes(original ? result.detectedItems : []);
  showSeen(result);
  showKeepChoice(result);
  showGenerated(result.processedImageUrls);
  showMask(result.maskUrl);
  const notes: string[] = [];
  if (result.isDesk === false) {
    notes.push("This photo does not look like a desk, so no new setup was generated. Here are shopping picks for what was found in it.");
  } else if (!result.processedImageUrl) {
    notes.push("The new setup could not be generated. Here are shopping picks anyway.");
  }
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
  if (reason instanceof UploadError) return reason.problem;
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

/** Submits the form (with `keep`: the last result's photo again, those items kept as they were). */
async function run(keep?: string[]): Promise<void> {
  clearProblem();
  resultSection.hidden = true;
  submit.disabled = true;
  keepRedo.disabled = true;
  form.setAttribute("aria-busy", "true");
  try {
    let request;
    if (keep) {
      request = { ...readForm(lastPhotoUrl), keep, preserveUnmasked: true };
    } else {
      const photoUrl = chosen ? await uploadedPhotoUrl(chosen) : undefined;
      request = readForm(photoUrl);
    }
    const submitted = await generateClient.generate(request);
    showProgress({ status: TaskStatus.QUEUED });
    const result = await follow(submitted.taskId);
    if (result.status === TaskStatus.DONE) showResult(result);
    else showProblem(taskFailure(result));
  } catch (err) {
    showProblem(describeError(err));
  } finally {
    progressSection.hidden = true;
    clearPreview();
    submit.disabled = false;
    keepRedo.disabled = false;
    form.removeAttribute("aria-busy");
  }
}

restoreApiKey();
watchPhotoInputs();
form.addEventListener("submit", (event) => {
  event.preventDefault();
  void run();
});
keepForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const kept = [...keepItems.querySelectorAll<HTMLInputElement>("input:checked")].map((box) => box.value);
  if (kept.length === 0) {
    showProblem({ summary: "Nothing is checked.", details: ["Check the items to keep, then redo."] });
    return;
  }
  void run(kept);
});
infoClient.getInfo({}).then(fillOptions, (err: unknown) => showProblem(describeError(err)));
