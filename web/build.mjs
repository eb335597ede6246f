// Bundles the page into dist/ (or the folder given as the first argument): one minified ES
// module, the stylesheet and index.html. The same sources and pinned packages give byte-identical
// output, so dist/ is committed and tests/browser.rs checks it against a fresh build.
import { copyFileSync, mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { build } from "esbuild";

const out = process.argv[2] ?? "dist";
rmSync(out, { recursive: true, force: true });
mkdirSync(join(out, "assets"), { recursive: true });
await build({
  entryPoints: ["src/main.ts"],
  outfile: join(out, "assets/app.js"),
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  banner: { js: "/* deskgen demo page. Bundles @bufbuild/protobuf and @connectrpc/connect(-web), Apache-2.0. */" },
  logLevel: "warning",
});
copyFileSync("src/style.css", join(out, "assets/style.css"));
copyFileSync("src/index.html", join(out, "index.html"));
