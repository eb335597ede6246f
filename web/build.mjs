// Bundles the page into dist/: one minified ES module, the stylesheet and index.html.
// Same sources and pinned packages give byte-identical output, so dist/ is committed.
import { copyFileSync, mkdirSync, rmSync } from "node:fs";
import { build } from "esbuild";

rmSync("dist", { recursive: true, force: true });
mkdirSync("dist/assets", { recursive: true });
await build({
  entryPoints: ["src/main.ts"],
  outfile: "dist/assets/app.js",
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  banner: { js: "/* deskgen demo page. Bundles @bufbuild/protobuf and @connectrpc/connect(-web), Apache-2.0. */" },
  logLevel: "warning",
});
copyFileSync("src/style.css", "dist/assets/style.css");
copyFileSync("src/index.html", "dist/index.html");
