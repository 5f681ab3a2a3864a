//! Builds a model's tokenizer both ways, Ember's byte-level BPE and the `tokenizers` one (from
//! a GGUF file's header, or from a tokenizer.json), and encodes and decodes the same text with
//! each: the times side by side, and whether the ids agree. `cargo run --release -p
//! ember-model-loader --example tokenizer_speed -- MODEL.gguf|tokenizer.json [TEXT_FILE]
//! [ROUNDS]`.

use std::time::Instant;

use ember_model_loader::bpe::ByteBpe;
use ember_model_loader::chat::tokenizer_from_bytes;
use ember_model_loader::gguf::{gguf_byte_bpe, gguf_tokenizer};
use ember_model_loader::gguf_header::GgufHeader;
use ember_model_loader::Tokenizer;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(model) = args.first() else {
        return Err("usage: tokenizer_speed MODEL.gguf|tokenizer.json [TEXT_FILE] [ROUNDS]".into());
    };
    let bytes = std::fs::read(model)?;
    let text = std::fs::read_to_string(args.get(1).map_or("README.md", String::as_str))?;
    let rounds: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(9).max(1);
    let header = if model.ends_with(".json") { None } else { Some(GgufHeader::read(&bytes)?) };
    let build = |ours: bool| -> Result<Tokenizer, Box<dyn std::error::Error>> {
        Ok(match (&header, ours) {
            (Some(h), true) => gguf_byte_bpe(h)?.into(),
            (Some(h), false) => gguf_tokenizer(h)?.into(),
            (None, true) => ByteBpe::from_tokenizer_json(&bytes).ok_or("not a byte-level BPE Ember reads")?.into(),
            (None, false) => tokenizer_from_bytes(&bytes)?.into(),
        })
    };

    let (mut ours_ms, mut theirs_ms) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let theirs = build(false)?;
        theirs_ms.push(t.elapsed().as_secs_f64() * 1e3);
        drop(theirs);
        let t = Instant::now();
        let ours = build(true)?;
        ours_ms.push(t.elapsed().as_secs_f64() * 1e3);
        drop(ours);
    }
    let (ours_build, theirs_build) = (median(ours_ms), median(theirs_ms));
    println!(
        "build, median of {rounds}: ByteBpe {ours_build:.1} ms, tokenizers {theirs_build:.1} ms ({:.2}x)",
        ours_build / theirs_build
    );

    let (ours, theirs) = (build(true)?, build(false)?);
    let mut ids = Vec::new();
    for (name, t) in [("ByteBpe", &ours), ("tokenizers", &theirs)] {
        let (mut enc, mut dec) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let s = Instant::now();
            let encoded = t.encode(&text)?;
            enc.push(s.elapsed().as_secs_f64() * 1e3);
            let s = Instant::now();
            t.decode(&encoded, false)?;
            dec.push(s.elapsed().as_secs_f64() * 1e3);
            ids.push(encoded);
        }
        println!(
            "{name}: {} bytes to {} ids, encode {:.2} ms, decode {:.2} ms",
            text.len(),
            ids[ids.len() - 1].len(),
            median(enc),
            median(dec)
        );
    }
    println!("same ids: {}", ids.windows(2).all(|w| w[0] == w[1]));
    Ok(())
}
