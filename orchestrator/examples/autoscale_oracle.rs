//! A hindsight schedule: a fixed worker count per window of the trace, each the least (up to 10)
//! that keeps the p95 wait of the jobs so far at or under a target, its workers started a cold
//! start ahead. It is a real run on the simulator, so its worker-seconds are reachable (by a
//! policy that knew the trace), and it tells whether a gap between a policy and the clairvoyant
//! bound is the policy's waste or the bound's slack. It is no optimum: at long cold starts
//! starting a cold start ahead holds workers through every dip shorter than one.
//!
//! ```text
//! cargo run -p ember-orchestrator --release --example autoscale_oracle -- TRACE COLD_START_S WAIT_S [WINDOW_S]
//! cargo run -p ember-orchestrator --release --example autoscale_oracle -- --ember-log TRACE COLD_START_S [EVERY_S]
//! ```
//!
//! The second form runs Ember instead and prints its decisions (every start or drain, and one
//! line every `EVERY_S` seconds) with the workers' states: how to see why it spent what it did.

use std::path::Path;

use ember_orchestrator::autoscale::bound::lower_bound;
use ember_orchestrator::autoscale::sim::{simulate, Report, SimOptions, WorkerModel};
use ember_orchestrator::autoscale::trace::Trace;
use ember_orchestrator::autoscale::{plan, Decision, Observation, Policy, PolicyConfig, PolicyKind, WorkerState};

/// Worker counts per window, started `lead` seconds ahead.
struct Schedule {
    window: f64,
    counts: Vec<u32>,
    lead: f64,
}

impl Policy for Schedule {
    fn name(&self) -> &str {
        "schedule"
    }

    fn interval(&self) -> f64 {
        0.5
    }

    fn decide(&mut self, obs: &Observation<'_>) -> Decision {
        let first = (obs.now / self.window).floor() as usize;
        let last = ((obs.now + self.lead) / self.window).floor() as usize;
        let mut want = (first..=last).filter_map(|k| self.counts.get(k)).copied().max().unwrap_or(0);
        if first >= self.counts.len() && obs.backlog.visible + obs.backlog.in_flight > 0 {
            want = self.counts.last().copied().unwrap_or(1).max(1);
        }
        plan(want, obs, "schedule")
    }
}

fn run(trace: &Trace, model: &WorkerModel, window: f64, counts: &[u32], upto: f64) -> Report {
    let jobs: Vec<_> = trace.jobs.iter().copied().filter(|j| j.at < upto).collect();
    let t = Trace { name: trace.name.clone(), duration: upto.min(trace.duration), jobs };
    let mut p = Schedule { window, counts: counts.to_vec(), lead: model.cold_start_s + 0.5 };
    simulate(&t, &mut p, model, &SimOptions::default())
}

/// Ember, with a line every `every` seconds: workers by state, backlog, and the rule.
struct Logged {
    inner: Box<dyn Policy>,
    every: f64,
    next: f64,
}

impl Policy for Logged {
    fn name(&self) -> &str {
        "ember"
    }

    fn interval(&self) -> f64 {
        self.inner.interval()
    }

    fn decide(&mut self, obs: &Observation<'_>) -> Decision {
        let d = self.inner.decide(obs);
        if obs.now >= self.next || d.start > 0 || !d.drain.is_empty() {
            if obs.now >= self.next {
                self.next += self.every;
            }
            let count = |s| obs.workers.iter().filter(|w| w.state == s).count();
            let busy: Vec<u32> = obs.workers.iter().filter_map(|w| w.busy).collect();
            eprintln!(
                "t={:.0} starting={} ready={} draining={} visible={} in_flight={} busy={:?} -> desired={} start={} drain={} {}",
                obs.now,
                count(WorkerState::Starting),
                count(WorkerState::Ready),
                count(WorkerState::Draining),
                obs.backlog.visible,
                obs.backlog.in_flight,
                busy,
                d.desired,
                d.start,
                d.drain.len(),
                d.reason
            );
        }
        d
    }
}

/// As the comparison's rows: at most 10 workers.
const MAX_WORKERS: u32 = 10;

const USAGE: &str =
    "usage: autoscale_oracle TRACE COLD_START_S WAIT_S [WINDOW_S] | --ember-log TRACE COLD_START_S [EVERY_S]";

/// Ember at its defaults on `path`, its decisions on stderr (every start or drain, and one line
/// every `every` seconds), its report on stdout.
fn ember_log(path: &str, cold: &str, every: Option<&String>) -> Result<(), Box<dyn std::error::Error>> {
    let trace = Trace::load(Path::new(path))?;
    let model = WorkerModel { cold_start_s: cold.parse()?, ..WorkerModel::default() };
    let every: f64 = every.map(|s| s.parse()).transpose()?.unwrap_or(60.0);
    let inner = PolicyConfig::defaults(PolicyKind::Ember).build()?;
    let mut p = Logged { inner, every, next: 0.0 };
    let r = simulate(&trace, &mut p, &model, &SimOptions::default());
    println!("{r:?}");
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, path, cold, rest @ ..] = args.as_slice() {
        if flag == "--ember-log" {
            return ember_log(path, cold, rest.first());
        }
    }
    let [path, cold, wait, rest @ ..] = args.as_slice() else {
        return Err(USAGE.into());
    };
    let trace = Trace::load(Path::new(path))?;
    let model = WorkerModel { cold_start_s: cold.parse()?, ..WorkerModel::default() };
    let wait: f64 = wait.parse()?;
    let window: f64 = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(60.0);
    let windows = (trace.duration / window).ceil().max(1.0) as usize;
    let mut counts: Vec<u32> = Vec::new();
    for k in 0..windows {
        let upto = (k + 1) as f64 * window;
        let mut chosen = MAX_WORKERS;
        for n in 0..=MAX_WORKERS {
            counts.push(n);
            let r = run(&trace, &model, window, &counts, upto);
            counts.pop();
            if r.done == r.jobs && r.wait_p95_s <= wait + 1e-9 {
                chosen = n;
                break;
            }
        }
        counts.push(chosen);
    }
    let r = run(&trace, &model, window, &counts, f64::INFINITY);
    let b = lower_bound(&trace, &model, r.wait_p95_s);
    println!(
        "{} c={} window={}: schedule {:.0} worker-s (p95 {:.2}, busy fill {:.2}, idle {:.0}, starting {:.0}) bound {:.0} -> {:.2}x",
        trace.name,
        model.cold_start_s,
        window,
        r.worker_seconds,
        r.wait_p95_s,
        r.busy_fill,
        r.idle_s,
        r.starting_s,
        b.worker_seconds,
        r.worker_seconds / b.worker_seconds
    );
    println!("counts: {counts:?}");
    println!("{b:?}");
    Ok(())
}
