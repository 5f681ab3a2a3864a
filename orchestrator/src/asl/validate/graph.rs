//! The graph checks: unknown targets, unreachable states, no terminal state, and cycles with
//! no exit (a warning).

use std::collections::{BTreeSet, VecDeque};

use serde_json::{Map, Value};

use super::{esc, Diagnostic, Severity, Validator};

impl Validator<'_> {
    pub(super) fn graph(&mut self, start: &str, states: &Map<String, Value>, at: &str) {
        // Computed on the raw JSON so a state with other errors still takes part.
        let edges = |s: &Value| -> Vec<String> {
            let mut e: Vec<String> = s.get("Next").and_then(Value::as_str).map(str::to_string).into_iter().collect();
            e.extend(s.get("Default").and_then(Value::as_str).map(str::to_string));
            for key in ["Choices", "Catch"] {
                if let Some(a) = s.get(key).and_then(Value::as_array) {
                    e.extend(a.iter().filter_map(|c| c.get("Next").and_then(Value::as_str).map(str::to_string)));
                }
            }
            e
        };
        let terminal = |s: &Value| {
            s.get("End") == Some(&Value::Bool(true))
                || matches!(s.get("Type").and_then(Value::as_str), Some("Succeed" | "Fail"))
        };
        let mut seen = BTreeSet::new();
        let mut queue = VecDeque::from([start.to_string()]);
        while let Some(n) = queue.pop_front() {
            if !seen.insert(n.clone()) {
                continue;
            }
            if let Some(s) = states.get(&n) {
                queue.extend(edges(s));
            }
        }
        for name in states.keys() {
            if !seen.contains(name) {
                self.err(
                    format!("{at}/States/{}", esc(name)),
                    format!("state '{name}' is unreachable from StartAt '{start}'"),
                );
            }
        }
        if !states.values().any(terminal) {
            self.err(
                format!("{at}/States"),
                "no terminal state: at least one state must have End: true or be a Succeed or Fail state",
            );
            return;
        }
        // States that can reach a terminal: fixpoint over reverse edges.
        let mut exits: BTreeSet<&str> = states.iter().filter(|(_, s)| terminal(s)).map(|(n, _)| n.as_str()).collect();
        loop {
            let before = exits.len();
            for (n, s) in states {
                if !exits.contains(n.as_str()) && edges(s).iter().any(|e| exits.contains(e.as_str())) {
                    exits.insert(n.as_str());
                }
            }
            if exits.len() == before {
                break;
            }
        }
        for name in states.keys() {
            if seen.contains(name) && !exits.contains(name.as_str()) {
                self.warn(
                    format!("{at}/States/{}", esc(name)),
                    format!("state '{name}' is in a cycle with no path to a terminal state: an execution that reaches it never ends (it stops at the hop limit)"),
                );
            }
        }
    }
}

/// Reports `Next`/`Default`/`Catch` targets that name no state, in this machine and the
/// nested ones.
pub(super) fn unknown_targets(doc: &Value, at: &str, out: &mut Vec<Diagnostic>) {
    let Some(states) = doc.get("States").and_then(Value::as_object) else { return };
    let exists = |n: &str| states.contains_key(n);
    for (name, s) in states {
        let sat = format!("{at}/States/{}", esc(name));
        let mut check = |loc: String, v: Option<&Value>| {
            if let Some(n) = v.and_then(Value::as_str) {
                if !exists(n) {
                    out.push(Diagnostic {
                        severity: Severity::Error,
                        location: loc,
                        message: format!("'{n}' is not a state of this machine"),
                    });
                }
            }
        };
        check(format!("{sat}/Next"), s.get("Next"));
        check(format!("{sat}/Default"), s.get("Default"));
        for (key, arr) in [("Choices", s.get("Choices")), ("Catch", s.get("Catch"))] {
            if let Some(a) = arr.and_then(Value::as_array) {
                for (i, c) in a.iter().enumerate() {
                    check(format!("{sat}/{key}/{i}/Next"), c.get("Next"));
                }
            }
        }
        if let Some(bs) = s.get("Branches").and_then(Value::as_array) {
            for (i, b) in bs.iter().enumerate() {
                unknown_targets(b, &format!("{sat}/Branches/{i}"), out);
            }
        }
        for key in ["ItemProcessor", "Iterator"] {
            if let Some(p) = s.get(key) {
                unknown_targets(p, &format!("{sat}/{key}"), out);
            }
        }
    }
}
