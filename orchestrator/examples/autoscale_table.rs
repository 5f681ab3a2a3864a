//! Ember's policy against the clairvoyant bound and the best peer, one line per trace and cold
//! start, with where Ember's worker-seconds went: the table of `ember autoscale simulate`
//! (same traces, worker model and defaults) without building the worker.
//!
//! ```text
//! python3 scripts/azure-trace.py   # target/traces/azure-conv.csv, when ../shared/traces is there
//! cargo run -p ember-orchestrator --release --example autoscale_table [-- --ember-only] [TRACE...]
//! ```
//!
//! With no trace given it runs the four shipped traces and `target/traces/azure-conv.csv` if
//! present. `--ember-only` skips the peers (no best-peer column; much faster). Notes on stderr
//! name any peer row cheaper than Ember at an equal or better p95, and any row below the bound
//! at its own p95 (which would be a bug in the bound).

use std::path::{Path, PathBuf};

use ember_orchestrator::autoscale::sim::{compare, standard_rows, Group, SimOptions, WorkerModel};
use ember_orchestrator::autoscale::trace::Trace;
use ember_orchestrator::autoscale::PolicyKind;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ember_only = args.iter().any(|a| a == "--ember-only");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut paths: Vec<PathBuf> = args.iter().filter(|a| !a.starts_with("--")).map(PathBuf::from).collect();
    if paths.is_empty() {
        for name in ["burst", "diurnal", "idle", "spike"] {
            paths.push(root.join(format!("examples/autoscale/{name}.json")));
        }
        let azure = root.join("target/traces/azure-conv.csv");
        if azure.exists() {
            paths.push(azure);
        } else {
            eprintln!("NOTE: {} not found (run scripts/azure-trace.py)", azure.display());
        }
    }
    let traces = paths.iter().map(|p| Trace::load(p)).collect::<Result<Vec<_>, _>>()?;
    let kinds: Vec<PolicyKind> = if ember_only { vec![PolicyKind::Ember] } else { PolicyKind::ALL.to_vec() };
    // As `ember autoscale simulate` at its defaults: 8 jobs per worker, 25 s grace.
    let model = WorkerModel::default();
    println!(
        "| trace | cold start s | Ember worker-s | x bound | Ember p95 s | best peer p95 s (row, worker-s) | \
         starting | idle | busy | draining | busy fill | cold starts |"
    );
    println!("|---|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|");
    for trace in &traces {
        let groups = compare(
            std::slice::from_ref(trace),
            &[1.0, 30.0, 90.0],
            &model,
            |m| standard_rows(&kinds, m),
            &SimOptions::default(),
        )?;
        for g in &groups {
            print_row(g);
        }
    }
    Ok(())
}

/// The simulator's step: p95 waits within one step are equal.
const STEP_S: f64 = 0.05;

fn print_row(g: &Group) {
    let Some(e) = g.reports.iter().find(|r| r.policy == "ember") else { return };
    for r in g.reports.iter().filter(|r| r.policy != "ember") {
        if r.wait_p95_s <= e.wait_p95_s + STEP_S && r.worker_seconds < e.worker_seconds {
            eprintln!(
                "NOTE: {} at {} s: {} is cheaper than ember at an equal or better p95",
                g.trace, g.cold_start_s, r.policy
            );
        }
        if r.over_bound < 1.0 {
            eprintln!("BUG: {} at {} s: {} is below the bound at its own p95", g.trace, g.cold_start_s, r.policy);
        }
    }
    let best = g
        .reports
        .iter()
        .filter(|r| r.policy != "ember")
        .min_by(|a, b| a.wait_p95_s.total_cmp(&b.wait_p95_s).then(a.worker_seconds.total_cmp(&b.worker_seconds)));
    let best = best
        .map_or_else(|| "-".to_string(), |b| format!("{:.2} ({}, {:.0})", b.wait_p95_s, b.policy, b.worker_seconds));
    println!(
        "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} |",
        g.trace,
        g.cold_start_s,
        e.worker_seconds,
        e.worker_seconds / g.bound.worker_seconds,
        e.wait_p95_s,
        best,
        e.starting_s,
        e.idle_s,
        e.busy_s,
        e.draining_s,
        e.busy_fill,
        e.cold_starts
    );
}
