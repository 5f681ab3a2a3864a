#!/usr/bin/env node
// llama.cpp speed peer for Ember's benchmarks (via node-llama-cpp, CPU only).
//
//   node scripts/llamacpp-bench.mjs --model FILE.gguf --threads N \
//        --prompt-tokens P --gen-tokens G [--parallel S] [--context-size C]
//
// Prints ONE JSON line on stdout:
//   {"engine":"llama.cpp","model":...,"threads":N,"prefill_tokens":...,"prefill_tps":...,
//    "decode_tokens":...,"decode_tps":...,"parallel":S, ...}
//
// Module resolution: node-llama-cpp is ESM-only and NODE_PATH does not apply to ESM
// `import`, so it is resolved with createRequire() from the cache that
// scripts/install-peers.sh fills: ${EMBER_CACHE:-$HOME/.cache/ember}/peers/node
// (override the directory with EMBER_PEERS_NODE_DIR). Falls back to a normal
// `import("node-llama-cpp")` if it is installed next to this script.
//
// What is measured (all S sequences share one context, one batch per step):
//   prefill: a P-token prompt per sequence (BOS + a fixed English text repeated and truncated
//            to P tokens), evaluated in one go, up to and including sampling the first token.
//            prefill_tps = S*P / wall time.
//   decode:  G further tokens per sequence, greedy (temperature 0), one forward pass each.
//            EOS/EOT does not stop generation (yieldEogToken), so exactly G tokens are
//            generated unless the API returns early; decode_tokens is the actual count.
//            decode_tps = total decoded tokens / wall time (aggregate over S sequences).
// A warm-up pass (same prompt + 2 decode steps, then the KV cache is cleared) runs first.
// prefill_cpu_s/decode_cpu_s are the process CPU seconds of each phase: if they are well
// below threads * wall seconds, the machine was busy and the numbers are low.
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";
import path from "node:path";
import os from "node:os";
import fs from "node:fs";

const PROMPT_TEXT =
  "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by " +
  "the sea, there lived an old fisherman who told stories about the stars, the tides and " +
  "the strange ships that sailed past the harbour at night. ";

function usage(msg) {
  if (msg) console.error(`error: ${msg}`);
  console.error(
    "usage: node scripts/llamacpp-bench.mjs --model FILE.gguf --threads N " +
      "--prompt-tokens P --gen-tokens G [--parallel S] [--context-size C]"
  );
  process.exit(2);
}

function parseArgs(argv) {
  const opts = { parallel: 1 };
  const intOpts = {
    "--threads": "threads",
    "--prompt-tokens": "promptTokens",
    "--gen-tokens": "genTokens",
    "--parallel": "parallel",
    "--context-size": "contextSize",
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const [key, inline] = a.includes("=") ? a.split(/=(.*)/s, 2) : [a, undefined];
    const val = () => (inline !== undefined ? inline : argv[++i]);
    if (key === "--model") opts.model = val();
    else if (key in intOpts) {
      const v = Number(val());
      if (!Number.isInteger(v) || v < 0) usage(`${key} needs a non-negative integer`);
      opts[intOpts[key]] = v;
    } else if (key === "-h" || key === "--help") usage();
    else usage(`unknown argument ${a}`);
  }
  if (!opts.model) usage("--model is required");
  if (!fs.existsSync(opts.model)) usage(`model not found: ${opts.model}`);
  for (const k of ["threads", "promptTokens", "genTokens"])
    if (opts[k] === undefined) usage(`--${k.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase())} is required`);
  if (opts.threads < 1) usage("--threads must be >= 1");
  if (opts.promptTokens < 1) usage("--prompt-tokens must be >= 1");
  if (opts.parallel < 1) usage("--parallel must be >= 1");
  return opts;
}

async function importNodeLlamaCpp() {
  const cache = process.env.EMBER_CACHE || path.join(os.homedir(), ".cache", "ember");
  const nodeDir = process.env.EMBER_PEERS_NODE_DIR || path.join(cache, "peers", "node");
  try {
    const req = createRequire(path.join(nodeDir, "package.json"));
    return await import(pathToFileURL(req.resolve("node-llama-cpp")).href);
  } catch (e) {
    try {
      return await import("node-llama-cpp");
    } catch {
      console.error(
        `node-llama-cpp not found under ${nodeDir} (${e.code || e.message}); ` +
          "run scripts/install-peers.sh first"
      );
      process.exit(1);
    }
  }
}

function buildPrompt(model, n) {
  const text = model.tokenize(PROMPT_TEXT);
  const tokens = model.tokens.bos != null ? [model.tokens.bos] : [];
  while (tokens.length < n) tokens.push(...text);
  return tokens.slice(0, n);
}

const round = (x, d = 2) => Math.round(x * 10 ** d) / 10 ** d;
// CPU seconds (user+sys, all threads of this process) between two process.cpuUsage() samples
const cpuSec = (a, b) => (b.user - a.user + b.system - a.system) / 1e6;

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const { getLlama, LlamaLogLevel } = await importNodeLlamaCpp();

  const llama = await getLlama({
    gpu: false,
    build: "never", // prebuilt CPU binary only; never download or compile llama.cpp
    maxThreads: opts.threads,
    logLevel: LlamaLogLevel.error,
    progressLogs: false,
  });
  const model = await llama.loadModel({ modelPath: opts.model, gpuLayers: 0 });
  const S = opts.parallel;
  const P = opts.promptTokens;
  const G = opts.genTokens;
  const context = await model.createContext({
    sequences: S,
    // per sequence; node-llama-cpp multiplies by `sequences` and pads to 256
    contextSize: opts.contextSize ?? P + G + 8,
    threads: { ideal: opts.threads, min: opts.threads },
  });
  const sequences = Array.from({ length: S }, () => context.getSequence());
  const prompt = buildPrompt(model, P);
  const evalOpts = { temperature: 0, yieldEogToken: true };

  // Warm-up: the same prompt plus two decode steps on every sequence, then clear the KV cache.
  {
    const warm = prompt;
    await Promise.all(
      sequences.map(async (seq) => {
        const it = seq.evaluate(warm, evalOpts);
        for (let i = 0; i < 2; i++) if ((await it.next()).done) break;
        await it.return();
        await seq.clearHistory();
      })
    );
  }

  const gens = sequences.map((seq) => seq.evaluate(prompt, evalOpts));

  // Prefill: first next() evaluates the whole prompt and samples the first token.
  const c0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  const firsts = await Promise.all(gens.map((g) => g.next()));
  const t1 = process.hrtime.bigint();
  const c1 = process.cpuUsage();

  // Decode: G more tokens per sequence, sequences run concurrently and get batched together.
  const outputs = firsts.map((r) => (r.done ? [] : [r.value]));
  const counts = await Promise.all(
    gens.map(async (g, i) => {
      if (firsts[i].done) return 0;
      let n = 0;
      while (n < G) {
        const r = await g.next();
        if (r.done) break;
        outputs[i].push(r.value);
        n++;
      }
      return n;
    })
  );
  const t2 = process.hrtime.bigint();
  const c2 = process.cpuUsage();
  await Promise.all(gens.map((g) => g.return()));

  const prefillSec = Number(t1 - t0) / 1e9;
  const decodeSec = Number(t2 - t1) / 1e9;
  const decodeTokens = counts.reduce((a, b) => a + b, 0);
  const result = {
    engine: "llama.cpp",
    model: path.basename(opts.model),
    threads: opts.threads,
    prefill_tokens: P * S,
    prefill_tps: round((P * S) / prefillSec),
    decode_tokens: decodeTokens,
    decode_tps: round(decodeTokens / decodeSec),
    parallel: S,
    prefill_s: round(prefillSec, 4),
    decode_s: round(decodeSec, 4),
    // CPU time of the timed phases: well below threads*wall means the machine was busy
    prefill_cpu_s: round(cpuSec(c0, c1), 4),
    decode_cpu_s: round(cpuSec(c1, c2), 4),
    context_size: context.contextSize,
    sample: model.detokenize(outputs[0].slice(0, 24)),
  };
  console.log(JSON.stringify(result));
  await context.dispose();
  await model.dispose();
  await llama.dispose();
}

main().catch((e) => {
  console.error(e?.stack || String(e));
  process.exit(1);
});
