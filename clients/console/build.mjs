// `npm run build` (make console): bundles the console with esbuild into the gateway's
// console_dist/ (index.html + assets/), which the gateway serves at `/`. Not committed.
import { copyFile, mkdir, rm, writeFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(
  process.env.CONSOLE_OUT_DIR ?? join(here, "../../services/gateway/src/charai/gateway/console_dist"),
);

await rm(out, { recursive: true, force: true });
await mkdir(join(out, "assets"), { recursive: true });
const result = await build({
  entryPoints: [
    { in: join(here, "src/main.ts"), out: "console" },
    { in: join(here, "src/console.css"), out: "console" },
  ],
  outdir: join(out, "assets"),
  bundle: true,
  format: "esm",
  target: ["es2022", "chrome110", "firefox110", "safari16"],
  minify: true,
  sourcemap: true,
  legalComments: "linked",
  metafile: true,
  logLevel: "warning",
});
await copyFile(join(here, "src/index.html"), join(out, "index.html"));
// The build output is never committed, wherever it is written.
await writeFile(join(out, ".gitignore"), "*\n");
const bytes = Object.entries(result.metafile.outputs)
  .filter(([file]) => !file.endsWith(".map"))
  .map(([file, meta]) => `${file.split("/").pop()} ${(meta.bytes / 1024).toFixed(1)} KiB`);
console.log(`console built into ${out}: ${bytes.join(", ")}`);
