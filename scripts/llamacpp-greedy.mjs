#!/usr/bin/env node
// Greedy tokens of llama.cpp (node-llama-cpp, CPU) after given prompt token ids, for the
// token-for-token checks in tests/tests/generation.rs:
//
//   node scripts/llamacpp-greedy.mjs FILE.gguf N ID,ID,...    -> prints N token ids, comma separated
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";
import path from "node:path";
import os from "node:os";

const [file, n, ids] = process.argv.slice(2);
const cache = process.env.EMBER_CACHE || path.join(os.homedir(), ".cache", "ember");
const req = createRequire(path.join(cache, "peers", "node", "package.json"));
const { getLlama, LlamaLogLevel } = await import(pathToFileURL(req.resolve("node-llama-cpp")).href);
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error, progressLogs: false });
const model = await llama.loadModel({ modelPath: file, gpuLayers: 0 });
const context = await model.createContext({ contextSize: 256, sequences: 1 });
const seq = context.getSequence();
const out = [];
for await (const t of seq.evaluate(ids.split(",").map(Number), { temperature: 0, yieldEogToken: true })) {
  out.push(t);
  if (out.length >= Number(n)) break;
}
console.log(out.join(","));
process.exit(0);
