#!/usr/bin/env python3
"""Converts Azure's public LLM inference trace to the simulator's CSV trace format.

Usage: scripts/azure-trace.py [IN [OUT]]
  IN   default ../shared/traces/AzureLLMInferenceTrace_conv.csv (beside the repository)
  OUT  default target/traces/azure-conv.csv

The input has one request a line: `TIMESTAMP,ContextTokens,GeneratedTokens`. The output has
`at_s,tokens` (see `ember autoscale simulate --help`), mapped to this machine's worker model:
- time: seconds since the first request, unscaled (the hour stays an hour);
- tokens: GeneratedTokens, unscaled. At the trace's mean of 211 generated tokens and 5.4
  requests/s it asks for about 1,140 tokens/s, 1,490 in its busiest minute: 6 to 8 of the
  simulator's workers (198 tokens/s each with 8 jobs in flight), so it fits the default
  10-worker limit as it is, with no thinning;
- ContextTokens (the prompt) are dropped: the simulator does not model prefill (it is batched
  and several times faster per token than decode on these workers), so the trace's load is
  understated by the prefill time.

The trace is CC-BY 4.0 and its citation is written into the output's header:
Patel et al., "Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024
(Azure/AzurePublicDataset).
"""
import csv
import datetime
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_IN = os.path.join(ROOT, "..", "shared", "traces", "AzureLLMInferenceTrace_conv.csv")
DEFAULT_OUT = os.path.join(ROOT, "target", "traces", "azure-conv.csv")


def parse_time(text):
    # 2023-11-16 18:15:46.6805900: seven fractional digits, one more than %f takes.
    head, _, frac = text.strip().partition(".")
    t = datetime.datetime.strptime(head, "%Y-%m-%d %H:%M:%S")
    return t.timestamp() + (float("0." + frac) if frac else 0.0)


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_IN
    dst = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_OUT
    if not os.path.exists(src):
        sys.exit(f"{src} not found: the Azure trace lives in ../shared/traces beside the repository")
    rows = []
    with open(src, newline="") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            try:
                rows.append((parse_time(row["TIMESTAMP"]), int(row["GeneratedTokens"])))
            except (KeyError, ValueError) as e:
                sys.exit(f"{src} line {n}: {e} (want TIMESTAMP,ContextTokens,GeneratedTokens)")
    if not rows:
        sys.exit(f"{src} has no requests")
    rows.sort()
    t0 = rows[0][0]
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with open(dst, "w") as out:
        out.write("# Azure LLM inference trace (conversation), 2023-11-16 18:15-19:14 UTC, CC-BY 4.0.\n")
        out.write('# Patel et al., "Splitwise: Efficient generative LLM inference using phase splitting",\n')
        out.write("# ISCA 2024 (Azure/AzurePublicDataset). Converted by scripts/azure-trace.py: seconds since\n")
        out.write("# the first request; tokens = GeneratedTokens (prompt tokens dropped: no prefill modelled).\n")
        out.write("at_s,tokens\n")
        for at, tokens in rows:
            out.write(f"{at - t0:.3f},{max(tokens, 1)}\n")
    print(f"{dst}: {len(rows)} requests over {rows[-1][0] - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
