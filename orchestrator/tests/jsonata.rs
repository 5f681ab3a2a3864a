//! Ember's JSONata (the `jsonata-rs` library plus what Ember adds) against the reference
//! implementation, jsonata-js 2.2.2 (Step Functions runs 2.0.6 of the same code), on the kinds
//! of expressions Step Functions workflows use: paths over `$states.input`, variables,
//! strings, numbers, arrays, objects, higher-order functions, dates.
//!
//! Every expression must give the reference's value. The few the library cannot evaluate
//! are listed in [`KNOWN_GAPS`]: for those Ember must fail with `States.QueryEvaluationError`
//! (which a state's Catch sees), never give a different value; a gap that starts working
//! fails the test so the list stays true (and CONFORMANCE.md with it).
//!
//! Needs node and jsonata-js (`scripts/install-test-deps.sh` puts it in
//! `~/.cache/ember/jsonata-js`, or `EMBER_JSONATA_JS`); without them the test fails and says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{json, Map, Value};

use ember_orchestrator::asl::jsonata::{evaluate, Bindings};

/// Expressions the library cannot evaluate yet, with why (see third_party/jsonata-rs/
/// EMBER-CHANGES.md for what Ember added to jsonata-rs 0.3.4).
const KNOWN_GAPS: &[(&str, &str)] = &[
    ("$states.input.items[0].%.customer", "the parent operator is not implemented"),
    ("$formatInteger(12, 'w')", "$formatInteger takes decimal-digit pictures only"),
];

/// What Ember's error says when the library panicked (and Ember caught it).
const PANIC_CAUGHT: &str = "does not support yet";

/// The corpus: (expression, what it exercises).
const EXPRESSIONS: &[&str] = &[
    // Paths and filters over the input.
    "$states.input.customer.name",
    "$states.input.items.sku",
    "$states.input.items[price > 10].sku",
    "$states.input.items[0]",
    "$states.input.items[-1].qty",
    "$states.input.items[qty >= 2 and price < 20].sku",
    "$count($states.input.items)",
    "$states.input.tags[1]",
    "$states.input.missing ? 'yes' : 'no'",
    "$exists($states.input.customer.email)",
    "$exists($states.input.customer.phone)",
    // The context value as a function's first argument inside a path.
    "$states.input.tags.$uppercase()",
    "$states.input.items.sku.$substring(0, 1)",
    "$states.input.items.price.$string()",
    "$states.input.items.sku.$substringAfter('-')",
    "$states.input.items.qty.$formatNumber('00')",
    "$states.input.items.$keys()",
    "$states.input.items.price.$uppercase()",
    // Variables.
    "$customer.tier",
    "$n * 2 + 1",
    "$limits.max - $n",
    "$states.input.items[qty > $n].sku",
    // Strings.
    "'Hello, ' & $states.input.customer.name & '!'",
    "$uppercase($states.input.customer.name)",
    "$lowercase('ÀB')",
    "$substring($states.input.customer.name, 0, 3)",
    "$substringBefore($states.input.customer.email, '@')",
    "$substringAfter($states.input.customer.email, '@')",
    "$split('a,b,,c', ',')",
    "$join($states.input.tags, '-')",
    "$trim('  padded   text ')",
    "$pad('7', 3, '0')",
    "$length('naïve')",
    "$contains($states.input.customer.email, 'example')",
    "$replace('a-b-c', '-', '+')",
    "$string(42)",
    "$string($states.input.customer)",
    "$string([1, 'two', true, null])",
    "$number('3.5') + 1",
    "$number('0x1F') + $number('0b101') + $number('0o17') + $number('-2.5e1')",
    "$number('+1')",
    "$number('.5')",
    "$base64encode('ember')",
    "$base64decode('ZW1iZXI=')",
    "$encodeUrlComponent('a b&c=d/é?')",
    "$encodeUrl('https://example.com/a b?q=1&r=é#f')",
    "$decodeUrlComponent('a%20b%26c%3Dd%2F%C3%A9%3F')",
    "$decodeUrl('https://example.com/a%20b?q=%26%C3%A9')",
    "$decodeUrlComponent('%E0%A4%A')",
    // Numbers.
    "1 / 3",
    "7 % 3",
    "$round(2.675, 2)",
    "$floor(-1.5)",
    "$ceil(1.2)",
    "$abs(-4)",
    "$power(2, 10)",
    "$sqrt(16)",
    "$sum($states.input.items.(price * qty))",
    "$max($states.input.items.price)",
    "$min([3, 1, 2])",
    "0.1 + 0.2",
    "1e3",
    "$average($states.input.items.price)",
    "$average([1, 2, 3, 4])",
    "$average([]) ? 'yes' : 'no'",
    "$formatNumber(1234.5, '#,##0.00')",
    "$formatNumber(3.14159, '0.00')",
    "$formatNumber(1234567, '#,###')",
    "$formatNumber(0.256, '0%')",
    "$formatNumber(0.2567, '#0.0%')",
    "$formatNumber(-1234.567, '#,##0.0')",
    "$formatNumber(42, '000')",
    "$formatNumber(0.5, '#.##')",
    "$formatNumber(12.3, '$#,##0.00')",
    "$formatNumber(-5, '#0;(#0)')",
    "$formatNumber(1234.5678, '00.000e0')",
    "$formatNumber(1234.5, '#.##0,00', {'decimal-separator': ',', 'grouping-separator': '.'})",
    "$formatNumber(1234.5, '#,##0.00.0')",
    "$formatNumber(1234.5, '#,##0.###')",
    "$formatNumber(0, '0.00')",
    "$formatNumber(1e6, '#,##0')",
    "$formatNumber(0.0012, '0.00e0')",
    "$formatNumber(-0.5, '0')",
    "$formatNumber(0.0125, '0.0‰')",
    "$formatNumber(123456.789, '#,##,###.00')",
    "$formatNumber(2.5, '0')",
    "$formatBase(255, 16)",
    "$formatBase(-10, 2)",
    "$formatBase(100)",
    "$formatBase(2.5, 2)",
    "$formatBase(10, 40)",
    "$formatInteger(1234567, '#,##0')",
    "$formatInteger(7, '000')",
    "$formatInteger(21, '0;o')",
    "$formatInteger(-12.7, '0')",
    "$formatInteger(1234567, '#,##,##0')",
    "$parseInteger('1,234,567', '#,##0')",
    "$parseInteger('007', '000')",
    // Booleans and comparisons.
    "$boolean('')",
    "$not(true)",
    "'b' > 'a'",
    "3 in [1, 2, 3]",
    "$states.input.customer.tier = 'gold' or $n > 5",
    // Arrays.
    "[1..5]",
    "$append([1, 2], [3])",
    "$reverse([1, 2, 3])",
    "$sort([3, 1, 2])",
    "$sort($states.input.items, function($a, $b) { $a.price > $b.price }).sku",
    "$distinct([1, 1, 2, 'a', 'a'])",
    "$count($shuffle([1..10]))",
    "$sort($shuffle([5, 3, 1, 4, 2]))",
    "$zip([1, 2], ['a', 'b'])",
    "$count([])",
    "$states.input.items^(price).sku",
    "[{'a': 1, 'b': 'x'}, {'a': 0, 'b': 'y'}, {'a': 1, 'b': 'z'}, {'a': 0, 'b': 'w'}]^(a, >b).b",
    "[{'a': 1, 'b': 'x'}, {'a': 0, 'b': 'y'}, {'a': 1, 'b': 'z'}, {'a': 0, 'b': 'w'}]^(>a, b).b",
    // Objects.
    "$keys($states.input.customer)",
    "$lookup($states.input.customer, 'tier')",
    "$merge([{'a': 1}, {'b': 2}, {'a': 3}])",
    "{'total': $sum($states.input.items.price), 'n': $count($states.input.items)}",
    "$states.input.items{sku: qty}",
    "$each($states.input.customer, function($v, $k) { $k & '=' & $v })",
    "$spread({'a': 1, 'b': 2})",
    "$spread($states.input.customer)",
    "$spread([{'a': 1, 'b': 2}, {'c': 3}])",
    "$sift({'a': 1, 'b': 0, 'c': 3}, function($v) { $v > 0 })",
    "$sift($states.input.customer, function($v, $k) { $k != 'email' })",
    "$sift({'a': 0}, function($v) { $v > 0 })",
    // Key order: JavaScript's (array-index keys first, ascending; then insertion order).
    "$keys({'zeta': 1, 'alpha': 2, 'mid': 3})",
    "$keys({'b': 1, '10': 2, '2': 3, 'a': 4})",
    "$keys($merge([{'b': 1, 'a': 2}, {'c': 3, 'b': 4}]))",
    "$string($merge([{'b': 1, 'a': 2}, {'c': 3, 'b': 4}]))",
    "$string({'z': {'y': 1, 'x': [2, {'w': 3, 'v': 4}]}, 'a': null})",
    "$each({'z': 1, 'y': 2, 'x': 3}, function($v, $k) { $k & $v })",
    "$keys($states.input.items{$string(10 - qty) & 'k': sku})",
    "$keys([{'q': 1, 'p': 2}, {'o': 3, 'q': 4}])",
    "$string($states.input.items[0] ~> |$|{'sku': 'z-9', 'added': true}, ['price']|)",
    // Types.
    "$type($states.input.items)",
    "[$type(null), $type('x'), $type(1), $type(true), $type({}), $type($sum), $type([])]",
    "$type($states.input.missing) ? 'defined' : 'undefined'",
    // Higher-order functions and blocks.
    "$map($states.input.items, function($i) { $i.price * $i.qty })",
    "$filter($states.input.items, function($i) { $i.qty > 1 }).sku",
    "$reduce([1, 2, 3, 4], function($acc, $x) { $acc + $x })",
    "($t := $states.input.items[0]; $t.sku & ':' & $t.qty)",
    "($f := function($x) { $x * $x }; $f(7))",
    "function($a) { $a + 1 }(1)",
    "($first3 := $substring(?, 0, 3); $first3('abcdef'))",
    "($domain := $substringAfter(?, '@') ~> $substringBefore(?, '.'); $domain($states.input.customer.email))",
    "$states.input.customer.email ~> $substringAfter(?, '@')",
    "$map($states.input.items, $lookup(?, 'sku'))",
    "substring(?, 0, 1)",
    // `$eval` is left out: Step Functions does not offer it (its docs say to use `$parse`), and
    // Ember answers it with that error (a unit test in asl/jsonata.rs).
    "$clone({'b': 1, 'a': [1, {'c': null}]})",
    "$keys($clone({'b': 1, 'a': 2}))",
    "$clone($states.input.items[0]).sku",
    "($adder := function($n) { function($x) { $x + $n } }; $adder(2)(5))",
    "$now('[Y0001]', 5) ? 'a' : 'b'",
    "$single($states.input.items, function($i) { $i.sku = 'b-2' }).price",
    "$states.input.items.{'sku': sku, 'cost': price * qty}",
    // Dates.
    "$toMillis('2026-11-30T12:00:00Z')",
    "$fromMillis(1700000000000)",
    // The context object.
    "$states.context.Execution.Name",
    "$states.context.State.Name & '@' & $states.context.State.RetryCount",
];

fn bindings() -> (Value, Map<String, Value>) {
    let states = json!({
        "input": {
            "customer": {"name": "Ada Lovelace", "email": "ada@example.com", "tier": "gold"},
            "items": [
                {"sku": "a-1", "price": 12.5, "qty": 2},
                {"sku": "b-2", "price": 3, "qty": 5},
                {"sku": "c-3", "price": 40, "qty": 1}
            ],
            "tags": ["new", "priority", "eu"]
        },
        "context": {
            "Execution": {"Id": "e1", "Name": "run-7", "StartTime": "2026-11-30T12:00:00Z"},
            "State": {"Name": "Price", "EnteredTime": "2026-11-30T12:00:01Z", "RetryCount": 0}
        }
    });
    let vars = json!({"customer": {"tier": "silver"}, "n": 3, "limits": {"max": 10}});
    (states, vars.as_object().cloned().unwrap())
}

fn jsonata_js() -> PathBuf {
    let dir = std::env::var_os("EMBER_JSONATA_JS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/ember/jsonata-js"));
    let module = dir.join("node_modules/jsonata");
    assert!(
        module.join("jsonata.js").is_file(),
        "jsonata-js is not in {} (scripts/install-test-deps.sh installs it): the reference is needed",
        dir.display()
    );
    module
}

/// Each expression's value by jsonata-js: `{"value": ...}`, `{"undefined": true}` or
/// `{"error": "..."}`.
fn reference(exprs: &[&str], states: &Value, vars: &Map<String, Value>) -> Vec<Value> {
    let script = r#"
const jsonata = require(process.argv[1]);
const req = JSON.parse(require('fs').readFileSync(0, 'utf8'));
(async () => {
  const out = [];
  for (const e of req.exprs) {
    try {
      const v = await jsonata(e).evaluate(undefined, Object.assign({states: req.states}, req.vars));
      out.push(v === undefined ? {undefined: true} : {value: JSON.parse(JSON.stringify(v))});
    } catch (err) {
      out.push({error: String(err.message || err)});
    }
  }
  process.stdout.write(JSON.stringify(out));
})();
"#;
    let mut child = Command::new("node")
        .arg("-e")
        .arg(script)
        .arg(jsonata_js())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("node (the reference JSONata runs on it) is not on PATH");
    let req = json!({"exprs": exprs, "states": states, "vars": vars});
    child.stdin.take().unwrap().write_all(req.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "node failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Numbers compared as numbers (1 and 1.0 are the same JSON number to both sides).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn ember_jsonata_gives_the_reference_implementation_s_values() {
    let (states, vars) = bindings();
    let gaps: Vec<&str> = KNOWN_GAPS.iter().map(|g| g.0).collect();
    let all: Vec<&str> = EXPRESSIONS.iter().copied().chain(gaps.iter().copied()).collect();
    let want = reference(&all, &states, &vars);
    let b = Bindings { states: &states, vars: &vars };
    let mut wrong = Vec::new();
    let (mut equal, mut gaps_seen) = (0, 0);
    for (expr, want) in all.iter().zip(&want) {
        let got = evaluate(expr, "Output", b);
        let is_gap = gaps.contains(expr);
        match (&got, want.get("value")) {
            (Ok(v), Some(w)) if same(v, w) => {
                if is_gap {
                    wrong.push(format!(
                        "{expr}: listed as a gap but now gives the reference's {w}: take it off KNOWN_GAPS"
                    ));
                } else {
                    equal += 1;
                }
            }
            (Err(e), _) if is_gap => {
                assert_eq!(e.error, "States.QueryEvaluationError", "{expr}: {e:?}");
                gaps_seen += 1;
            }
            (Err(e), None) if want.get("undefined").is_some() => {
                assert!(e.cause.contains("returned nothing (undefined)"), "{expr}: {e:?}");
                equal += 1;
            }
            // Both fail; Ember's error must be the library's, not a panic it caught.
            (Err(e), None) if want.get("error").is_some() && !e.cause.contains(PANIC_CAUGHT) => {
                assert_eq!(e.error, "States.QueryEvaluationError", "{expr}: {e:?}");
                equal += 1;
            }
            _ => wrong.push(format!("{expr}: Ember {got:?}, reference {want}")),
        }
    }
    eprintln!("{} expressions: {equal} equal to jsonata-js 2.2.2, {gaps_seen} known gaps failing cleanly", all.len());
    assert!(wrong.is_empty(), "{} differ from the reference:\n{}", wrong.len(), wrong.join("\n"));
}

/// Calls missing arguments (or given the wrong kind) are the user's mistakes: each must give
/// a value or a `States.QueryEvaluationError` from the library, never a panic (which Ember
/// would catch, but which means the library did not check its input). jsonata-js gives an
/// error for some of these and undefined for others, so the reference is not consulted.
const MISUSED_CALLS: &[&str] = &[
    "$round()",
    "$each()",
    "$each({'a': 1})",
    "$spread()",
    "$sift({'a': 1})",
    "$formatNumber(1)",
    "$formatBase()",
    "$average('x')",
    "$type()",
    "$encodeUrl(1)",
    "$fromMillis()",
    "$toMillis()",
    "$reduce([1])",
    "$pad('x')",
    "$substring('abc')",
    "$split('a')",
    "$join()",
    "$match('a')",
    "$replace('a', 'b')",
    "$zip()",
    "$sort()",
    "$lookup({})",
    "$keys()",
    "$merge()",
    "$string()",
    "$number()",
    "$abs()",
    "$power(2)",
    "$sqrt()",
    "$contains('a')",
    "$exists()",
    "$count()",
    "$distinct()",
    "$reverse()",
    "$append()",
    "$single()",
    "$filter([1])",
    "$map([1])",
    "$base64encode()",
    "$uppercase()",
    "$trim()",
    "$length()",
    "($t := |$|{'a': 1}|; $t())",
    "$sum('a')",
    "$substring(1)",
    "$pad(1, 'a')",
    "$join('a', 1)",
    "$uppercase(1)",
    "$split(1, 'a')",
    "$now(1)",
    "$fromMillis('x')",
    "$toMillis(1)",
    "$number([])",
    "$sort(1)",
    "$zip(1)",
    "$keys(1)",
    "$lookup(1, 'a')",
    "$match(1, /a/)",
    "$replace(1, 'a', 'b')",
    "$contains(1, 'a')",
    "$length(1)",
    "$trim(1)",
    "$base64decode(1)",
    "$formatInteger(1, 1)",
    "$parseInteger(1, '0')",
    "$sift(1, $sum)",
    "$single(1, 1)",
    "$filter(1, 1)",
    "$map(1, 1)",
    "$reduce(1, 1)",
    "$power('a', 1)",
    "$sqrt('a')",
    "$abs('a')",
    "$floor('a')",
    "$ceil('a')",
    "$round('a')",
    "$distinct(1)",
    "$reverse(1)",
    "$exists(1, 2)",
    "$boolean(1, 2)",
    "$not()",
    "$string(1, 'x')",
    "$max('a')",
    "$min(['a'])",
    "$formatNumber('a', '0')",
    "$formatNumber(1, '0', 'x')",
    "$formatBase(1, 'x')",
    "$decodeUrl(1)",
    "$spread(1, 2)",
    "$type(1, 2)",
    "$shuffle(1, 2)",
    "$average(1, 2)",
    "$each(1, 1)",
    "$merge(1)",
    "$assert(false)",
    "$error()",
    "$uuid(1)",
    "$millis(1)",
    "$random(1, 2)",
    "$partition()",
    "$range()",
    "$hash()",
    "$parse()",
    "[1,2,3][$ > 'a']",
    "{'a': 1}.a.b.c",
    "$states.input.items[[0..1]]",
    "1..2",
    "[1..'a']",
    "-'a'",
    "'a' + 1",
    "$x := 1",
    "function($a){$a}(1)",
    "$states.input ~> $keys",
    "$states.input.items@$i",
    "$states.input.items#$i.sku",
    "**.sku",
    "$states.input.*",
    "$states.input.items{sku: 1}{'a': 2}",
];

#[test]
fn misused_calls_fail_without_a_panic_in_the_library() {
    let (states, vars) = bindings();
    let b = Bindings { states: &states, vars: &vars };
    let panicked: Vec<String> = MISUSED_CALLS
        .iter()
        .filter_map(|expr| match evaluate(expr, "Output", b) {
            Err(e) if e.cause.contains(PANIC_CAUGHT) => Some(format!("{expr}: {}", e.cause)),
            Err(e) => {
                assert_eq!(e.error, "States.QueryEvaluationError", "{expr}: {e:?}");
                None
            }
            Ok(_) => None,
        })
        .collect();
    eprintln!("{} misused calls, {} panicked in the library", MISUSED_CALLS.len(), panicked.len());
    assert!(panicked.is_empty(), "the library panicked on:\n{}", panicked.join("\n"));
}
