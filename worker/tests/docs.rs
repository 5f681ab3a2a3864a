//! The docs cannot drift: every ```sh block of README.md, infra/README.md and
//! examples/*/README.md runs as written (in a clean copy of the repository, with this build's
//! `ember` first on PATH), unless the line before it says otherwise, where a reader sees it:
//!
//! - `<!-- docs-test: skip: REASON -->`: not run (it needs AWS, a GPU, or a long build); the
//!   reason is printed with the test's output.
//! - `<!-- docs-test: setup: COMMAND -->`: COMMAND runs first (state a reader would have).
//! - `<!-- docs-test: usage -->`: a synopsis with placeholders: each `ember ...` line's
//!   subcommands must exist, its options must be in that command's `--help`, and it must name
//!   every option the command requires.
//!
//! The blocks of one file run in order in one copy, as a reader runs them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

#[derive(Debug)]
enum Mark {
    Run,
    Skip(String),
    Setup(String),
    Usage,
}

#[derive(Debug)]
struct Block {
    file: String,
    line: usize,
    mark: Mark,
    text: String,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The ```sh blocks of `file` with the mark on the line before each.
fn blocks(root: &Path, file: &str) -> anyhow::Result<Vec<Block>> {
    let text = std::fs::read_to_string(root.join(file)).with_context(|| format!("reading {file}"))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() != "```sh" {
            i += 1;
            continue;
        }
        let start = i;
        let end = (i + 1..lines.len())
            .find(|&j| lines[j].trim_end() == "```")
            .with_context(|| format!("{file}:{}: unclosed ```sh block", start + 1))?;
        let before = if start > 0 { lines[start - 1].trim() } else { "" };
        let mark = match before.strip_prefix("<!-- docs-test:").and_then(|m| m.strip_suffix("-->")) {
            None => Mark::Run,
            Some(m) => {
                let m = m.trim();
                if let Some(reason) = m.strip_prefix("skip:") {
                    if reason.trim().is_empty() {
                        bail!("{file}:{start}: a skipped block must say why");
                    }
                    Mark::Skip(reason.trim().to_string())
                } else if let Some(cmd) = m.strip_prefix("setup:") {
                    Mark::Setup(cmd.trim().to_string())
                } else if m == "usage" {
                    Mark::Usage
                } else {
                    bail!("{file}:{start}: unknown docs-test mark {m:?}");
                }
            }
        };
        out.push(Block { file: file.to_string(), line: start + 1, mark, text: lines[start + 1..end].join("\n") });
        i = end + 1;
    }
    Ok(out)
}

/// The documented files: README.md, infra/README.md, examples/*/README.md.
fn documented(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut files = vec!["README.md".to_string(), "infra/README.md".to_string()];
    let mut examples = Vec::new();
    for entry in std::fs::read_dir(root.join("examples"))? {
        let entry = entry?;
        if entry.path().join("README.md").is_file() {
            examples.push(format!("examples/{}/README.md", entry.file_name().to_string_lossy()));
        }
    }
    examples.sort();
    files.extend(examples);
    Ok(files)
}

/// A copy of the repository's tracked files (as `git ls-files` lists them), so a block runs
/// where a fresh clone would, and its outputs go nowhere else.
fn clean_copy(root: &Path, to: &Path) -> anyhow::Result<()> {
    let out = Command::new("git").arg("-C").arg(root).args(["ls-files", "-z"]).output()?;
    if !out.status.success() {
        bail!("git ls-files: {}", String::from_utf8_lossy(&out.stderr));
    }
    for name in out.stdout.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = Path::new(std::str::from_utf8(name)?);
        let (from, dest) = (root.join(name), to.join(name));
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // A file deleted in the working tree but not yet in the index is not there to copy.
        if from.is_file() {
            std::fs::copy(&from, &dest).with_context(|| format!("copying {}", name.display()))?;
        }
    }
    Ok(())
}

/// A shell in `dir` with this build's `ember` first on PATH and no AWS or Ember settings
/// from the environment of the test.
fn shell(dir: &Path, bin: &Path, script: &str) -> anyhow::Result<Command> {
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new("bash");
    cmd.current_dir(dir).args(["-eo", "pipefail", "-c", script]).env("PATH", path);
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") || k.starts_with("EMBER_") || k == "RUST_BACKTRACE" {
            cmd.env_remove(k);
        }
    }
    // Nothing may probe the instance metadata address off this machine.
    cmd.env("AWS_EC2_METADATA_DISABLED", "true");
    Ok(cmd)
}

/// Checks one synopsis line (`ember dlq list|answer|redrive`, `ember run FILE --model M`).
fn check_usage(line: &str) -> anyhow::Result<()> {
    let line = line.split(" #").next().unwrap_or(line).trim();
    let Some(rest) = line.strip_prefix("ember ") else { return Ok(()) };
    let words: Vec<&str> = rest.split_whitespace().collect();
    let is_word =
        |w: &str| !w.is_empty() && w.split('|').all(|a| a.chars().all(|c| c.is_ascii_lowercase() || c == '-'));
    // The subcommand path, each word possibly `a|b|c`, and an optional `[sub` after it.
    let mut paths: Vec<Vec<String>> = vec![Vec::new()];
    let mut rest_at = words.len();
    for (i, w) in words.iter().enumerate() {
        let (optional, w) = match w.strip_prefix('[') {
            Some(w) => (true, w),
            None => (false, *w),
        };
        if w.starts_with('-') || !is_word(w) {
            rest_at = i;
            break;
        }
        let mut next = Vec::new();
        for p in &paths {
            if optional {
                next.push(p.clone());
            }
            for alt in w.split('|') {
                let mut q = p.clone();
                q.push(alt.to_string());
                next.push(q);
            }
        }
        paths = next;
    }
    let flags: Vec<String> = words[rest_at..]
        .iter()
        .filter_map(|w| w.trim_start_matches('[').strip_prefix("--"))
        .map(|f| format!("--{}", f.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).next().unwrap_or(f)))
        .collect();
    let mut helps = Vec::new();
    for p in &paths {
        let out = Command::new(env!("CARGO_BIN_EXE_ember")).args(p).arg("--help").output()?;
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("`ember {}` does not exist: {}", p.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        // Required options are outside [] on clap's usage line.
        let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap_or_default().to_string();
        let mut depth = 0;
        let mut outside = String::new();
        for c in usage.chars() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                c if depth == 0 => outside.push(c),
                _ => {}
            }
        }
        for required in outside.split_whitespace().filter(|w| w.starts_with("--")) {
            // A line that lists several subcommands names the options they have in common.
            if paths.len() == 1 && !words.iter().any(|w| w.trim_start_matches('[').starts_with(required)) {
                bail!("`{line}` leaves out {required}, which `ember {}` requires", p.join(" "));
            }
        }
        helps.push(help);
    }
    for flag in &flags {
        if !helps.iter().any(|h| h.contains(&format!("{flag} ")) || h.contains(&format!("{flag}\n"))) {
            bail!("`{line}`: {flag} is not an option of `ember {}`", paths[0].join(" "));
        }
    }
    Ok(())
}

#[test]
fn every_documented_command_runs_as_written() -> anyhow::Result<()> {
    let root = repo_root();
    let bin = tempfile::tempdir()?;
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_ember"), bin.path().join("ember"))?;
    let mut ran = Vec::new();
    let mut skipped = Vec::new();
    for file in documented(&root)? {
        let copy = tempfile::tempdir()?;
        clean_copy(&root, copy.path())?;
        for block in blocks(&root, &file)? {
            let at = format!("{}:{}", block.file, block.line);
            let script = match &block.mark {
                Mark::Skip(reason) => {
                    skipped.push(format!("{at}: {reason}"));
                    continue;
                }
                Mark::Usage => {
                    for line in block.text.lines() {
                        check_usage(line).with_context(|| format!("{at}: a usage line is wrong"))?;
                    }
                    ran.push(format!("{at} (usage)"));
                    continue;
                }
                Mark::Setup(setup) => format!("{setup}\n{}", block.text),
                Mark::Run => block.text.clone(),
            };
            let out = shell(copy.path(), bin.path(), &script)?.output()?;
            if !out.status.success() {
                bail!(
                    "{at}: the block failed ({}):\n{}\n--- stdout\n{}\n--- stderr\n{}",
                    out.status,
                    block.text,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            ran.push(at);
        }
    }
    eprintln!("docs test: ran {} blocks:\n  {}", ran.len(), ran.join("\n  "));
    eprintln!("docs test: skipped {} blocks, as marked:\n  {}", skipped.len(), skipped.join("\n  "));
    assert!(!ran.is_empty(), "no block ran");
    Ok(())
}

#[test]
fn a_usage_line_that_leaves_out_a_required_option_is_caught() {
    assert!(check_usage("ember run batch.jsonl --model M   # ok").is_ok());
    let err = check_usage("ember run batch.jsonl [--output out.jsonl]").map_err(|e| e.to_string());
    assert!(err.as_ref().is_err_and(|e| e.contains("leaves out --model")), "{err:?}");
    let err = check_usage("ember status --no-such-flag").map_err(|e| e.to_string());
    assert!(err.as_ref().is_err_and(|e| e.contains("--no-such-flag is not an option")), "{err:?}");
    let err = check_usage("ember stauts").map_err(|e| e.to_string());
    assert!(err.as_ref().is_err_and(|e| e.contains("does not exist")), "{err:?}");
}
