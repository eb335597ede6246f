// Drives the demo page in Debian's Chromium through playwright-core; run by tests/browser.rs.
//
//   node web/tests/demo.mjs SCENARIO
//
// Environment: DESKGEN_URL (the server), DESKGEN_SCREENSHOT (where to save the page once a result
// shows), DESKGEN_IMAGES (folder of PNGs served for http://example.invalid/ images, as the scripted
// pipeline's results point there), DESKGEN_PHOTO_URL (the desk photo to submit), DESKGEN_PHOTOS
// (folder of photo files to choose on the page: desk.jpg, sideways.jpg, big-sideways.jpg,
// broken.jpg), DESKGEN_API_KEY, DESKGEN_TIMEOUT_MS (how long a generation may take),
// DESKGEN_FOREIGN_URL (a page of another origin, for the foreign scenario). Exits non-zero on the
// first failed check.

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const base = process.env.DESKGEN_URL;
assert.ok(base, "DESKGEN_URL is required");
const timeout = Number(process.env.DESKGEN_TIMEOUT_MS ?? 30000);
const photoUrl = process.env.DESKGEN_PHOTO_URL ?? "http://example.invalid/desk.png";

// Flags that keep Chromium off the (closed) network and quiet in a container.
const FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--disable-quic",
];

/** Serves the scripted pipeline's example.invalid images (photo, result, products) from DESKGEN_IMAGES. */
async function serveExampleImages(context) {
  const folder = process.env.DESKGEN_IMAGES;
  if (!folder) return;
  await context.route(/^https?:\/\/example\.invalid\//, (route) => {
    const path = new URL(route.request().url()).pathname;
    const name = path.startsWith("/p/") ? "product.png" : path === "/desk.png" ? "original.png" : "generated.png";
    return route.fulfill({ contentType: "image/png", body: readFileSync(join(folder, name)) });
  });
}

/** The page in use, for the report when a check fails. */
let current;

/** Opens the page and checks that it loaded from this origin alone and filled its options. */
async function openPage(context) {
  const page = await context.newPage();
  current = page;
  const problems = [];
  page.on("pageerror", (err) => problems.push(`page error: ${err.message}`));
  // Only the page's own origin, plus the images a result points at.
  const allowed = [new URL(base).origin, new URL(photoUrl).origin, "http://example.invalid", "https://example.invalid"];
  page.on("request", (request) => {
    if (request.url().startsWith("data:")) return;
    const origin = new URL(request.url()).origin;
    if (!allowed.includes(origin)) problems.push(`request to ${request.url()}`);
  });
  await page.goto(base, { waitUntil: "load" });
  await page.getByRole("heading", { name: "deskgen", level: 1 }).waitFor();
  // GetInfo over grpc-web fills the scheduler choices.
  await page.locator("#scheduler option[value]:not([value=''])").first().waitFor({ state: "attached" });
  return { page, problems };
}

async function fill(page, { photo, prompt, key }) {
  await page.getByLabel("Desk photo URL").fill(photo ?? "");
  await page.getByLabel("What would you like?").fill(prompt ?? "");
  if (key !== undefined) await page.getByLabel("API key").fill(key);
}

/** Submits and returns every progress text shown until the result or an error appears. */
async function submit(page) {
  const seen = [];
  const watcher = setInterval(async () => {
    const text = await page.locator("#progress-text").textContent().catch(() => null);
    if (text && seen.at(-1) !== text) seen.push(text);
  }, 20);
  await page.getByRole("button", { name: "Generate" }).click();
  try {
    await page.locator("#result:not([hidden]), #error:not([hidden])").first().waitFor({ timeout });
  } finally {
    clearInterval(watcher);
  }
  return seen;
}

async function errorText(page) {
  return (await page.locator("#error").textContent()) ?? "";
}

async function assertImageLoaded(page, selector) {
  const image = page.locator(selector);
  await image.waitFor();
  await page.waitForFunction((s) => {
    const img = document.querySelector(s);
    return img && img.complete && img.naturalWidth > 0;
  }, selector, { timeout });
}

/** The shopping cards as the page shows them, by category heading. */
async function shoppingCards(page) {
  return page.locator("#shopping .category").evaluateAll((groups) => groups.map((group) => ({
    category: group.querySelector("h3")?.textContent,
    cards: [...group.querySelectorAll(".card")].map((card) => ({
      title: card.querySelector("a, span")?.textContent,
      link: card.querySelector("a")?.href,
      price: card.querySelector(".price")?.textContent,
      mall: card.querySelector(".mall")?.textContent,
      image: card.querySelector("img")?.getAttribute("src"),
    })),
  })));
}

/** A photo file from DESKGEN_PHOTOS. */
function photoFile(name) {
  const folder = process.env.DESKGEN_PHOTOS;
  assert.ok(folder, "DESKGEN_PHOTOS is required");
  return join(folder, name);
}

/** Chooses `path` with the file input (through the DevTools protocol) and waits for its preview. */
async function choosePhoto(page, path) {
  await page.getByLabel("Choose a photo of your desk").setInputFiles(path);
  await page.locator("#photo-preview").waitFor();
  await assertImageLoaded(page, "#photo-preview-image");
  assert.match(await page.locator("#photo-preview-image").getAttribute("src"), /^blob:/);
}

/**
 * Keeps what each XMLHttpRequest (the page's uploads; its API calls use fetch) was answered, as
 * DevTools may drop a response body before the test reads it.
 */
async function recordUploadAnswers(context) {
  await context.addInitScript(() => {
    window.uploadAnswers = [];
    const open = XMLHttpRequest.prototype.open;
    XMLHttpRequest.prototype.open = function (...args) {
      this.addEventListener("load", () => window.uploadAnswers.push({ status: this.status, upload: this.response }));
      return open.apply(this, args);
    };
  });
}

/** Submits with a chosen photo; returns what POST /v1/uploads answered and the progress seen. */
async function submitWithUpload(page) {
  const before = await page.evaluate(() => window.uploadAnswers.length);
  const progress = await submit(page);
  const answers = await page.evaluate(() => window.uploadAnswers);
  assert.equal(answers.length, before + 1, "one upload");
  return { ...answers.at(-1), progress };
}

/** The natural size of a loaded image. */
async function naturalSize(page, selector) {
  await assertImageLoaded(page, selector);
  return page.locator(selector).evaluate((img) => [img.naturalWidth, img.naturalHeight]);
}

/** The boxes over the original, as fractions of the displayed image, with their labels. */
async function drawnBoxes(page) {
  return page.locator("#original .frame").evaluate((frame) => {
    const image = frame.querySelector("img").getBoundingClientRect();
    return [...frame.querySelectorAll(".box")].map((box) => {
      const r = box.getBoundingClientRect();
      return {
        label: box.textContent,
        left: (r.left - image.left) / image.width,
        top: (r.top - image.top) / image.height,
        right: (r.right - image.left) / image.width,
        bottom: (r.bottom - image.top) / image.height,
      };
    });
  });
}

/** Checks the verdict, and that every listed item has a box inside the displayed original. */
async function assertWhatWasSeen(page) {
  assert.equal(await page.locator("#seen").isVisible(), true, "what deskgen saw is shown");
  assert.equal(await page.locator("#desk-verdict").textContent(), "Yes");
  assert.ok((await page.locator("#caption").textContent()).length > 0, "a caption");
  assert.equal(await page.locator("#control").textContent(), "canny ControlNet at 0.80", "the desk's default control");
  const items = await page.locator("#detected-items li").allTextContents();
  assert.ok(items.some((t) => t.startsWith("dog (")), `items: ${items}`);
  const drawn = await drawnBoxes(page);
  assert.equal(drawn.length, items.length, "one box per item");
  for (const box of drawn) {
    assert.match(box.label, /^\S.* \d+%$/);
    assert.ok(box.left >= -0.01 && box.top >= -0.01 && box.right <= 1.01 && box.bottom <= 1.01, JSON.stringify(box));
    assert.ok(box.right > box.left && box.bottom > box.top, JSON.stringify(box));
  }
  return drawn;
}

async function screenshot(page) {
  const path = process.env.DESKGEN_SCREENSHOT;
  if (path) await page.screenshot({ path, fullPage: true });
}

const scenarios = {
  /** Scripted pipeline: options, live progress, images, cards, errors, fallback. */
  async scripted(context) {
    const { page, problems } = await openPage(context);
    const schedulers = await page.locator("#scheduler option").evaluateAll((os) => os.map((o) => o.value));
    assert.deepEqual(schedulers, ["", "ddim", "euler"]);
    assert.equal(await page.locator("#lora-field").isHidden(), true, "no LoRA list when none exist");

    await fill(page, { photo: photoUrl, prompt: "a minimal wooden desk with warm light" });
    const progress = await submit(page);
    assert.equal(await page.locator("#error").isHidden(), true, `no error expected: ${await errorText(page)}`);
    assert.ok(progress.some((t) => /Drawing the new setup: step \d+ of \d+/.test(t)), `progress seen: ${progress}`);
    await assertImageLoaded(page, "#original-image");
    await assertImageLoaded(page, "#generated-image");
    assert.equal(await page.locator("#original-image").getAttribute("src"), photoUrl);
    assert.match(await page.locator("#generated-image").getAttribute("src"), /^http:\/\/example\.invalid\/.+\.png$/);
    const groups = await shoppingCards(page);
    assert.deepEqual(groups, [{
      category: "마우스",
      cards: [{
        title: "무선 마우스",
        link: "https://example.invalid/p/1",
        price: "21990원",
        mall: "네이버",
        image: "https://example.invalid/p/1.jpg",
      }],
    }]);
    assert.equal(await page.locator("#result-note").isHidden(), true, "no note for a desk");
    await screenshot(page);

    // Not a desk: the fallback message and the cards, no generated image.
    await fill(page, { photo: photoUrl, prompt: "notdesk" });
    await submit(page);
    assert.match(await page.locator("#result-note").textContent(), /does not look like a desk/);
    assert.equal(await page.locator("#generated-image").isHidden(), true, "no generated image");
    assert.match(await page.locator("#generated .placeholder").textContent(), /No new image/);
    assert.equal((await shoppingCards(page))[0].category, "마우스");

    // A failed task reads as a sentence, with its code.
    await fill(page, { photo: photoUrl, prompt: "fail" });
    await submit(page);
    assert.match(await errorText(page), /The image model failed.*scripted failure.*MODEL_ERROR/s);
    assert.equal(await page.locator("#result").isHidden(), true, "no result after a failure");

    // Validation errors come from grpc-status-details-bin and mark the field.
    await fill(page, { photo: "", prompt: "   " });
    await submit(page);
    assert.match(await errorText(page), /Prompt must not be empty\..*INVALID_INPUT/s);
    assert.equal(await page.getByLabel("What would you like?").getAttribute("aria-invalid"), "true");
    await fill(page, { photo: "ftp://example.invalid/desk.png", prompt: "desk" });
    await submit(page);
    assert.match(await errorText(page), /initial_image_url must be an absolute/);
    assert.equal(await page.getByLabel("Desk photo URL").getAttribute("aria-invalid"), "true");
    assert.equal(await page.getByLabel("What would you like?").getAttribute("aria-invalid"), null);

    assert.deepEqual(problems, []);
  },

  /** A server with an API key: a wrong key shows an error, the right one works and is remembered. */
  async auth(context) {
    const key = process.env.DESKGEN_API_KEY;
    assert.ok(key, "DESKGEN_API_KEY is required");
    const { page, problems } = await openPage(context);
    await fill(page, { photo: photoUrl, prompt: "desk", key: "not-the-key" });
    await submit(page);
    assert.match(await errorText(page), /API key was not accepted.*UNAUTHENTICATED/s);
    assert.equal(await page.getByLabel("API key").getAttribute("aria-invalid"), "true");

    // The photo upload asks for the key too, and says so the same way.
    await choosePhoto(page, photoFile("desk.jpg"));
    const refused = await submitWithUpload(page);
    assert.equal(refused.status, 401);
    assert.equal(refused.upload.error_code, "UNAUTHENTICATED");
    assert.match(await errorText(page), /API key was not accepted.*A valid API key is required.*UNAUTHENTICATED/s);
    assert.equal(await page.getByLabel("API key").getAttribute("aria-invalid"), "true");
    await page.getByRole("button", { name: "Remove photo" }).click();

    await fill(page, { photo: photoUrl, prompt: "desk", key });
    await submit(page);
    assert.equal(await page.locator("#error").isHidden(), true, `no error expected: ${await errorText(page)}`);
    assert.equal((await shoppingCards(page))[0].category, "마우스");
    await page.reload();
    assert.equal(await page.getByLabel("API key").inputValue(), key, "kept in sessionStorage");
    assert.deepEqual(problems, []);
  },

  /** Photos chosen on the page: uploaded (with progress), upright, small enough, reused, refused. */
  async photos(context) {
    const { page, problems } = await openPage(context);
    const uploads = [];
    page.on("request", (r) => {
      if (r.url() === `${base}/v1/uploads`) uploads.push(r.method());
    });
    // The drop zone shows the focus of the file input inside it, which the keyboard reaches.
    await page.getByLabel("Choose a photo of your desk").focus();
    assert.equal(await page.locator("#drop-zone").evaluate((zone) => zone.matches(":focus-within")), true);

    // A real JPEG, sent as it is; slow uploads show their progress.
    const desk = photoFile("desk.jpg");
    await choosePhoto(page, desk);
    assert.match(await page.locator("#photo-preview-name").textContent(), /^desk\.jpg \(\d+ KB\)$/);
    const cdp = await context.newCDPSession(page);
    await cdp.send("Network.enable");
    await cdp.send("Network.emulateNetworkConditions", {
      offline: false, latency: 0, downloadThroughput: -1, uploadThroughput: 256 * 1024,
    });
    await page.getByLabel("What would you like?").fill("a tidy desk");
    const first = await submitWithUpload(page);
    await cdp.send("Network.emulateNetworkConditions", {
      offline: false, latency: 0, downloadThroughput: -1, uploadThroughput: -1,
    });
    assert.equal(await page.locator("#error").isHidden(), true, `no error expected: ${await errorText(page)}`);
    assert.equal(first.status, 201);
    const sent = readFileSync(desk);
    assert.equal(first.upload.content_type, "image/jpeg");
    assert.deepEqual([first.upload.width, first.upload.height], [768, 576]);
    assert.equal(first.upload.bytes, statSync(desk).size, "a small JPEG goes as it is");
    assert.equal(first.upload.sha256, createHash("sha256").update(sent).digest("hex"));
    assert.ok(first.progress.some((t) => /^Sending your photo: \d+%$/.test(t)), `progress seen: ${first.progress}`);
    assert.ok(first.upload.url.startsWith(`${base}/v1/images/`), first.upload.url);
    assert.equal(await page.locator("#original-image").getAttribute("src"), first.upload.url);
    assert.deepEqual(await naturalSize(page, "#original-image"), [768, 576], "the stored original");
    assert.equal(await page.locator("#desk-verdict").textContent(), "Yes");
    assert.equal(await page.locator("#caption").textContent(), "a desk with a laptop");
    assert.equal(await page.locator("#control").textContent(), "Nothing: plain image-to-image");
    assert.equal(await page.locator("#no-items").isVisible(), true);

    // Another generation from the same photo names the stored original again.
    await page.getByLabel("What would you like?").fill("a tidy desk with plants");
    await submit(page);
    assert.equal(await page.locator("#original-image").getAttribute("src"), first.upload.url);
    assert.deepEqual(uploads, ["POST"], "sent once");

    // Stored sideways with EXIF orientation 6: the server stores it upright.
    await choosePhoto(page, photoFile("sideways.jpg"));
    const turned = await submitWithUpload(page);
    assert.deepEqual([turned.upload.width, turned.upload.height], [32, 64]);
    assert.deepEqual(await naturalSize(page, "#original-image"), [32, 64], "upright");

    // Too big and sideways: the browser turns it upright and makes it 2048 px on its longer side.
    await choosePhoto(page, photoFile("big-sideways.jpg"));
    const shrunk = await submitWithUpload(page);
    assert.equal(shrunk.upload.content_type, "image/jpeg");
    assert.deepEqual([shrunk.upload.width, shrunk.upload.height], [1024, 2048]);
    assert.deepEqual(await naturalSize(page, "#original-image"), [1024, 2048], "upright and smaller");
    const colours = await page.locator("#original-image").evaluate((img) => {
      const canvas = document.createElement("canvas");
      [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
      const context = canvas.getContext("2d");
      context.drawImage(img, 0, 0);
      return [context.getImageData(512, 256, 1, 1).data, context.getImageData(512, 1792, 1, 1).data].map((d) => [...d]);
    });
    assert.ok(colours[0][0] > 200 && colours[0][2] < 60, `red (the left half) on top: ${colours}`);
    assert.ok(colours[1][2] > 200 && colours[1][0] < 60, `blue below: ${colours}`);

    // Not an image at all: the server's reason, its code, and the photo field marked.
    await page.getByLabel("Choose a photo of your desk").setInputFiles(photoFile("broken.jpg"));
    const broken = await submitWithUpload(page);
    assert.equal(broken.status, 422);
    assert.match(await errorText(page), /The photo was not accepted\..*cannot be used.*INVALID_INPUT/s);
    assert.equal(await page.getByLabel("Choose a photo of your desk").getAttribute("aria-invalid"), "true");
    assert.equal(await page.locator("#result").isHidden(), true);

    // Without the photo, the link is used again.
    await page.getByRole("button", { name: "Remove photo" }).click();
    assert.equal(await page.locator("#photo-preview").isHidden(), true);
    await fill(page, { photo: photoUrl, prompt: "desk" });
    await submit(page);
    assert.equal(await page.locator("#error").isHidden(), true, `no error expected: ${await errorText(page)}`);
    assert.equal(await page.locator("#original-image").getAttribute("src"), photoUrl);
    assert.deepEqual(problems, []);
  },

  /** The real pipeline on a real photo: the photo, the generated PNG from /v1/images, the cards. */
  async real(context) {
    const { page, problems } = await openPage(context);
    await fill(page, { photo: photoUrl, prompt: "warm wooden tones" });
    await page.locator("summary").click();
    // 10 steps: previews after steps 5 and 10 (the default interval).
    await page.getByLabel("Steps").fill("10");
    await page.getByLabel("Images").fill("2");
    await page.evaluate(() => {
      window.previewSizes = [];
      const preview = document.getElementById("progress-preview");
      preview.addEventListener("load", () => window.previewSizes.push([preview.naturalWidth, preview.naturalHeight]));
    });
    const progress = await submit(page);
    const previewSizes = await page.evaluate(() => window.previewSizes);
    assert.ok(previewSizes.length >= 1, "the picture is shown while it is drawn");
    for (const size of previewSizes) assert.deepEqual(size, [144, 112], "half the 288x224 image");
    assert.equal(await page.locator("#progress-preview").isHidden(), true, "gone with the result");
    assert.equal(await page.locator("#error").isHidden(), true, `no error expected: ${await errorText(page)}`);
    assert.ok(progress.some((t) => t.startsWith("Drawing the new setup")), `progress seen: ${progress}`);
    await assertImageLoaded(page, "#original-image");
    await assertImageLoaded(page, "#generated-image");
    await assertImageLoaded(page, "figure.more-generated img");
    const generated = await page
      .locator("#generated-image, figure.more-generated img")
      .evaluateAll((imgs) => imgs.map((img) => [img.src, img.naturalWidth, img.naturalHeight]));
    assert.equal(generated.length, 2, "two images side by side");
    assert.notEqual(generated[0][0], generated[1][0], "each image has its own URL");
    for (const [src, ...size] of generated) {
      assert.ok(src.startsWith(`${base}/v1/images/`) && src.endsWith(".png"), src);
      // dog.jpg's 4:3 at the tiny model's native area (256²), sides multiples of 16.
      assert.deepEqual(size, [288, 224], "the photo's shape");
    }
    assert.equal(await page.locator("figure.more-generated figcaption").textContent(), "Generated 2");
    await page.getByLabel("Images").fill("");
    const groups = await shoppingCards(page);
    assert.ok(groups.length > 0, "shopping groups");
    for (const group of groups) {
      assert.match(group.category, /[가-힣]/, "Korean display names");
      assert.ok(group.cards.length > 0, group.category);
      for (const card of group.cards) {
        assert.ok(card.title && card.link?.startsWith("https://"), JSON.stringify(card));
        assert.match(card.price, /^\d+원$/);
        assert.ok(card.mall, JSON.stringify(card));
      }
    }
    await assertWhatWasSeen(page);

    // Keep the dog as it is and redo: the mask is shown beside the image, black over the dog.
    await page.getByLabel("Images").fill("1");
    await page.getByRole("checkbox", { name: "dog" }).check();
    await page.getByRole("button", { name: "Redo, keeping the checked items" }).click();
    await page.locator("#mask:not([hidden])").waitFor({ timeout });
    assert.equal(await page.locator("#error").isHidden(), true, `no error expected: ${await errorText(page)}`);
    await assertImageLoaded(page, "#mask-image");
    const maskSrc = await page.locator("#mask-image").getAttribute("src");
    assert.ok(maskSrc.startsWith(`${base}/v1/images/`) && maskSrc.endsWith("-mask.png"), maskSrc);
    assert.deepEqual(await naturalSize(page, "#mask-image"), [288, 224]);
    await page.getByLabel("Images").fill("");

    // The same photo chosen as a file: stored, then shown with what deskgen saw in it.
    await choosePhoto(page, process.env.DESKGEN_PHOTO_FILE);
    await page.getByLabel("Desk photo URL").fill("");
    const sent = await submitWithUpload(page);
    assert.equal(await page.locator("#error").isHidden(), true, `no error expected: ${await errorText(page)}`);
    assert.equal(sent.status, 201);
    assert.equal(await page.locator("#original-image").getAttribute("src"), sent.upload.url);
    assert.deepEqual(await naturalSize(page, "#original-image"), [sent.upload.width, sent.upload.height]);
    await assertImageLoaded(page, "#generated-image");
    assert.equal(await page.locator("figure.more-generated").count(), 0, "one image when one is asked for");
    assert.equal(await page.locator("#mask").isHidden(), true, "no mask without a keep");
    await assertWhatWasSeen(page);
    await screenshot(page);
    assert.deepEqual(problems, []);
  },

  // A page of another origin (DESKGEN_FOREIGN_URL, served by the test) tries to submit tasks to
  // deskgen by fetch and by a form post, then puts what it saw in its title; the test asks deskgen
  // which of the tasks exist.
  async foreign(context) {
    const page = await context.newPage();
    current = page;
    await page.goto(process.env.DESKGEN_FOREIGN_URL);
    await page.waitForFunction(() => document.title.startsWith("done"), null, { timeout });
    console.log(`foreign page: ${await page.title()}`);
  },
};

const scenario = scenarios[process.argv[2]];
assert.ok(scenario, `unknown scenario ${process.argv[2]}; one of ${Object.keys(scenarios)}`);
const profile = mkdtempSync(join(tmpdir(), "deskgen-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.DESKGEN_CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: FLAGS,
  viewport: { width: 1100, height: 900 },
});
try {
  await serveExampleImages(context);
  await recordUploadAnswers(context);
  await scenario(context);
  console.log(`browser scenario ${process.argv[2]}: ok`);
} catch (err) {
  if (current) {
    console.error(`page text when it failed:\n${await current.locator("body").innerText().catch(() => "?")}`);
    const shot = process.env.DESKGEN_SCREENSHOT?.replace(/\.png$/, "-failed.png");
    if (shot) await current.screenshot({ path: shot, fullPage: true }).catch(() => {});
  }
  throw err;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
