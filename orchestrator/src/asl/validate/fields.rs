//! Map fields, Retry and Catch.

use serde_json::{Map, Value};

use super::{esc, Diagnostic, Severity, Validator};
use crate::asl::definition::*;
use crate::asl::path;

impl Validator<'_> {
    pub(super) fn map(&mut self, obj: &Map<String, Value>, at: &str, state: &mut State) -> Option<Kind> {
        let (key, proc) = match (obj.get("ItemProcessor"), obj.get("Iterator")) {
            (Some(p), None) => ("ItemProcessor", p),
            (None, Some(p)) => ("Iterator", p),
            (Some(_), Some(_)) => {
                self.err(format!("{at}/Iterator"), "give ItemProcessor or the legacy Iterator, not both");
                return None;
            }
            (None, None) => {
                self.err(at.to_string(), "a Map state needs an ItemProcessor");
                return None;
            }
        };
        if let Some(mode) = proc.pointer("/ProcessorConfig/Mode") {
            if mode != "INLINE" {
                self.err(format!("{at}/{key}/ProcessorConfig/Mode"), "only INLINE Map processing is supported");
            }
        }
        let processor = self.machine(proc, &format!("{at}/{key}"), false);
        let item_selector = match (obj.get("ItemSelector"), state.parameters.take()) {
            (Some(_), Some(_)) => {
                self.err(format!("{at}/Parameters"), "give ItemSelector or the legacy Parameters, not both");
                None
            }
            (Some(_), None) => self.template(obj, "ItemSelector", at),
            (None, p) => p,
        };
        let items_path = match obj.get("ItemsPath") {
            None => "$".to_string(),
            Some(Value::String(p)) => {
                if let Err(e) = path::check_path(p) {
                    self.err(format!("{at}/ItemsPath"), e);
                }
                p.clone()
            }
            Some(_) => {
                self.err(format!("{at}/ItemsPath"), "ItemsPath must be a path string");
                "$".to_string()
            }
        };
        let max_concurrency = match obj.get("MaxConcurrency") {
            None => 0,
            Some(v) => v.as_u64().unwrap_or_else(|| {
                self.err(format!("{at}/MaxConcurrency"), "MaxConcurrency must be an integer >= 0");
                0
            }),
        };
        let tolerated_percentage = obj.get("ToleratedFailurePercentage").and_then(|v| {
            let p = v.as_f64().filter(|p| (0.0..=100.0).contains(p));
            if p.is_none() {
                self.err(
                    format!("{at}/ToleratedFailurePercentage"),
                    "ToleratedFailurePercentage must be a number from 0 to 100",
                );
            }
            p
        });
        let tolerated_count = obj.get("ToleratedFailureCount").and_then(|v| {
            let c = v.as_u64();
            if c.is_none() {
                self.err(format!("{at}/ToleratedFailureCount"), "ToleratedFailureCount must be an integer >= 0");
            }
            c
        });
        let limit_paths = MapLimitPaths {
            max_concurrency: self.limit_path(obj, "MaxConcurrency", at),
            tolerated_percentage: self.limit_path(obj, "ToleratedFailurePercentage", at),
            tolerated_count: self.limit_path(obj, "ToleratedFailureCount", at),
        };
        Some(Kind::Map {
            processor: Box::new(processor?),
            items_path,
            items: None,
            item_selector,
            max_concurrency,
            tolerated_percentage,
            tolerated_count,
            limit_paths,
        })
    }

    /// `{key}Path`: a path, and not given together with `{key}`.
    fn limit_path(&mut self, obj: &Map<String, Value>, key: &str, at: &str) -> Option<String> {
        let pkey = format!("{key}Path");
        let p = obj.get(&pkey)?;
        if obj.contains_key(key) {
            self.err(format!("{at}/{pkey}"), format!("give {key} or {pkey}, not both"));
        }
        match p.as_str() {
            Some(p) => {
                if let Err(e) = path::check_path(p) {
                    self.err(format!("{at}/{pkey}"), e);
                }
                Some(p.to_string())
            }
            None => {
                self.err(format!("{at}/{pkey}"), format!("{pkey} must be a path string"));
                None
            }
        }
    }

    fn error_equals(&mut self, obj: &Map<String, Value>, at: &str, last: bool) -> Vec<String> {
        let names: Vec<String> = match obj.get("ErrorEquals").and_then(Value::as_array) {
            Some(a) if !a.is_empty() && a.iter().all(Value::is_string) => {
                a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()
            }
            _ => {
                self.err(format!("{at}/ErrorEquals"), "ErrorEquals must be a non-empty array of error names");
                return Vec::new();
            }
        };
        if names.iter().any(|n| n == "States.ALL") {
            if names.len() > 1 {
                self.err(format!("{at}/ErrorEquals"), "States.ALL must appear alone in ErrorEquals");
            }
            if !last {
                self.err(format!("{at}/ErrorEquals"), "States.ALL must be in the last Retry/Catch entry");
            }
        }
        names
    }

    pub(super) fn retriers(&mut self, obj: &Map<String, Value>, at: &str) -> Vec<Retrier> {
        let Some(v) = obj.get("Retry") else { return Vec::new() };
        let Some(items) = v.as_array() else {
            self.err(format!("{at}/Retry"), "Retry must be an array");
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, r) in items.iter().enumerate() {
            let rat = format!("{at}/Retry/{i}");
            let Some(o) = r.as_object() else {
                self.err(rat, "a retrier must be an object");
                continue;
            };
            for k in o.keys() {
                if ![
                    "ErrorEquals",
                    "IntervalSeconds",
                    "MaxAttempts",
                    "BackoffRate",
                    "MaxDelaySeconds",
                    "JitterStrategy",
                    "Comment",
                ]
                .contains(&k.as_str())
                {
                    self.err(format!("{rat}/{}", esc(k)), format!("unknown Retry field '{k}'"));
                }
            }
            let error_equals = self.error_equals(o, &rat, i + 1 == items.len());
            let mut num = |k: &str, default: f64, ok: &dyn Fn(f64) -> bool, msg: &str| match o.get(k) {
                None => default,
                Some(v) => match v.as_f64().filter(|n| ok(*n)) {
                    Some(n) => n,
                    None => {
                        self.diags.push(Diagnostic {
                            severity: Severity::Error,
                            location: format!("{rat}/{k}"),
                            message: msg.to_string(),
                        });
                        default
                    }
                },
            };
            let interval_seconds = num(
                "IntervalSeconds",
                1.0,
                &|n| n >= 1.0 && n.fract() == 0.0,
                "IntervalSeconds must be an integer >= 1",
            );
            let max_attempts =
                num("MaxAttempts", 3.0, &|n| n >= 0.0 && n.fract() == 0.0, "MaxAttempts must be an integer >= 0")
                    as u32;
            let backoff_rate = num("BackoffRate", 2.0, &|n| n >= 1.0, "BackoffRate must be a number >= 1.0");
            let max_delay_seconds = o.get("MaxDelaySeconds").map(|_| {
                num(
                    "MaxDelaySeconds",
                    0.0,
                    &|n| n >= 1.0 && n.fract() == 0.0,
                    "MaxDelaySeconds must be an integer >= 1",
                )
            });
            let jitter_full = match o.get("JitterStrategy").map(|v| v.as_str()) {
                None | Some(Some("NONE")) => false,
                Some(Some("FULL")) => true,
                _ => {
                    self.err(format!("{rat}/JitterStrategy"), "JitterStrategy must be FULL or NONE");
                    false
                }
            };
            out.push(Retrier {
                error_equals,
                interval_seconds,
                max_attempts,
                backoff_rate,
                max_delay_seconds,
                jitter_full,
            });
        }
        out
    }

    pub(super) fn catchers(&mut self, obj: &Map<String, Value>, at: &str, ql: QueryLanguage) -> Vec<Catcher> {
        let Some(v) = obj.get("Catch") else { return Vec::new() };
        let Some(items) = v.as_array() else {
            self.err(format!("{at}/Catch"), "Catch must be an array");
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, c) in items.iter().enumerate() {
            let cat = format!("{at}/Catch/{i}");
            let Some(o) = c.as_object() else {
                self.err(cat, "a catcher must be an object");
                continue;
            };
            let fields: &[&str] = match ql {
                QueryLanguage::JsonPath => &["ErrorEquals", "Next", "ResultPath", "Assign", "Comment"],
                QueryLanguage::JsonAta => &["ErrorEquals", "Next", "Output", "Assign", "Comment"],
            };
            for k in o.keys() {
                if !fields.contains(&k.as_str()) {
                    self.err(
                        format!("{cat}/{}", esc(k)),
                        format!(
                            "field '{k}' is not allowed in a Catch of a {} state (allowed: {})",
                            ql.name(),
                            fields.join(", ")
                        ),
                    );
                }
            }
            let error_equals = self.error_equals(o, &cat, i + 1 == items.len());
            let Some(next) = o.get("Next").and_then(Value::as_str) else {
                self.err(format!("{cat}/Next"), "a catcher needs a Next");
                continue;
            };
            let result_path = self.path_field(o, "ResultPath", &cat, true);
            let assign = self.assign(o, &cat, ql);
            let output = self.jsonata_template(o, "Output", &cat);
            out.push(Catcher { error_equals, next: next.to_string(), result_path, assign, output });
        }
        out
    }
}
