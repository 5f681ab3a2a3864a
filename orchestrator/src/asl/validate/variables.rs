//! Workflow variables: every reference must name a variable some state of its scope (or an
//! enclosing one) assigns, and a Parallel branch or Map item processor cannot assign a
//! variable of an enclosing scope (it sees those read-only; data leaves a branch through its
//! output).

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::{esc, Diagnostic, Severity};
use crate::asl::definition::QueryLanguage;
use crate::asl::jsonata;

/// Checks the variable scopes of a whole definition (already parsed without errors).
pub(super) fn check(doc: &Value, ql: QueryLanguage, out: &mut Vec<Diagnostic>) {
    scope(doc, "", ql, &BTreeSet::new(), out);
}

/// Scope findings are warnings: Step Functions accepts such definitions and fails (or reads
/// nothing) when the state runs (recorded: a reference to a variable no state assigns is a
/// `States.QueryEvaluationError` at run time), and Ember runs them the same way.
fn err(out: &mut Vec<Diagnostic>, location: String, message: String) {
    out.push(Diagnostic { severity: Severity::Warning, location, message });
}

/// The machine's query language for its states, and each state's.
fn state_ql(state: &Map<String, Value>, machine: QueryLanguage) -> QueryLanguage {
    match state.get("QueryLanguage").and_then(Value::as_str) {
        Some("JSONata") => QueryLanguage::JsonAta,
        Some("JSONPath") => QueryLanguage::JsonPath,
        _ => machine,
    }
}

/// Names assigned by an `Assign` object (JSONPath keys lose their `.$`).
fn assigned(assign: Option<&Value>, at: String, found: &mut Vec<(String, String)>) {
    if let Some(Value::Object(m)) = assign {
        for k in m.keys() {
            let name = k.strip_suffix(".$").unwrap_or(k);
            found.push((name.to_string(), format!("{at}/Assign/{}", esc(k))));
        }
    }
}

/// Every `(variable, location)` a state's Assign fields (state, Choice rules, catchers) set.
fn state_assigns(state: &Map<String, Value>, at: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    assigned(state.get("Assign"), at.to_string(), &mut found);
    for list in ["Choices", "Catch"] {
        if let Some(Value::Array(items)) = state.get(list) {
            for (i, item) in items.iter().enumerate() {
                assigned(item.get("Assign"), format!("{at}/{list}/{i}"), &mut found);
            }
        }
    }
    found
}

/// Child machines of a state: Parallel branches and the Map item processor.
fn children(state: &Map<String, Value>, at: &str) -> Vec<(Value, String)> {
    let mut out = Vec::new();
    if let Some(Value::Array(bs)) = state.get("Branches") {
        for (i, b) in bs.iter().enumerate() {
            out.push((b.clone(), format!("{at}/Branches/{i}")));
        }
    }
    for key in ["ItemProcessor", "Iterator"] {
        if let Some(p) = state.get(key) {
            out.push((p.clone(), format!("{at}/{key}")));
        }
    }
    out
}

/// The variables a state reads, with where: JSONata `{% %}` strings anywhere in the state;
/// in JSONPath states the `.$` values, the `*Path` fields (except `ResultPath`, which
/// writes) and Choice `Variable`s.
fn references(v: &Value, at: &str, ql: QueryLanguage, key: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::String(s) => {
            let exprs: Vec<&str> = match ql {
                QueryLanguage::JsonAta => jsonata::expression(s).into_iter().collect(),
                QueryLanguage::JsonPath => {
                    let reads =
                        key.ends_with(".$") || (key.ends_with("Path") && key != "ResultPath") || key == "Variable";
                    if reads {
                        vec![s.as_str()]
                    } else {
                        Vec::new()
                    }
                }
            };
            for e in exprs {
                for name in jsonata::variable_references(e) {
                    out.push((name, at.to_string()));
                }
            }
        }
        Value::Object(m) => {
            for (k, x) in m {
                if matches!(k.as_str(), "Branches" | "ItemProcessor" | "Iterator") {
                    continue;
                }
                references(x, &format!("{at}/{}", esc(k)), ql, k, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                references(x, &format!("{at}/{i}"), ql, key, out);
            }
        }
        _ => {}
    }
}

fn scope(machine: &Value, at: &str, ql: QueryLanguage, outer: &BTreeSet<String>, out: &mut Vec<Diagnostic>) {
    let ql = match machine.get("QueryLanguage").and_then(Value::as_str) {
        Some("JSONata") => QueryLanguage::JsonAta,
        Some("JSONPath") => QueryLanguage::JsonPath,
        _ => ql,
    };
    let Some(states) = machine.get("States").and_then(Value::as_object) else { return };
    let mut own = BTreeSet::new();
    for (name, s) in states {
        let Some(s) = s.as_object() else { continue };
        for (var, loc) in state_assigns(s, &format!("{at}/States/{}", esc(name))) {
            if outer.contains(&var) {
                err(
                    out,
                    loc,
                    format!("'{var}' is a variable of an enclosing scope: a Parallel branch or Map item processor can read it but not assign it (return the value in the branch's output instead, or use another name)"),
                );
            }
            own.insert(var);
        }
    }
    let visible: BTreeSet<String> = outer.union(&own).cloned().collect();
    for (name, s) in states {
        let Some(s) = s.as_object() else { continue };
        let sat = format!("{at}/States/{}", esc(name));
        let mut refs = Vec::new();
        references(&Value::Object(s.clone()), &sat, state_ql(s, ql), "", &mut refs);
        for (var, loc) in refs {
            if !visible.contains(&var) {
                err(
                    out,
                    loc,
                    format!("'${var}' is not a variable any state of this scope or an enclosing one assigns (variables assigned inside a Parallel branch or Map item processor are not visible outside it)"),
                );
            }
        }
        for (child, cat) in children(s, &sat) {
            scope(&child, &cat, ql, &visible, out);
        }
    }
}
