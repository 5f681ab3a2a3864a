//! Times one model's prefill and decode steps in a loop, for `perf record`: where a forward
//! pass spends its time. `cargo run --release -p ember-model-loader --example forward_speed --
//! MODEL [PROMPT_TOKENS] [SECONDS] [prefill|decode] [auto|f32|f16|bf16]` (`RAYON_NUM_THREADS` sets
//! the threads).

use std::time::Instant;

use ember_model_loader::{load, DTypeChoice, LoadOptions, ModelRef, SeqCache};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(model) = args.first() else {
        return Err("usage: forward_speed MODEL [PROMPT_TOKENS] [SECONDS] [prefill|decode] [auto|f32|f16|bf16]".into());
    };
    let p: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(17);
    let seconds: f64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5.0);
    let what = args.get(3).map(String::as_str).unwrap_or("prefill");
    let dtype: DTypeChoice = args.get(4).map_or(Ok(DTypeChoice::Auto), |d| d.parse())?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let opts = LoadOptions { dtype, ..Default::default() };
    let loaded = rt.block_on(load(&ModelRef::Local(model.into()), &opts))?;
    // Token ids 1.. stand in for a prompt: the work per token does not depend on the ids.
    let prompt: Vec<u32> = (1..=p as u32).collect();
    let (t0, mut steps) = (Instant::now(), 0usize);
    while t0.elapsed().as_secs_f64() < seconds {
        let mut cache = SeqCache::new();
        loaded.model.forward(&prompt, &mut cache)?;
        if what == "decode" {
            for i in 0..64 {
                loaded.model.forward(&[i + 1], &mut cache)?;
            }
            steps += 64;
        } else {
            steps += 1;
        }
    }
    let per = t0.elapsed().as_secs_f64() / steps as f64;
    println!("{what}: {steps} steps, {:.2} ms each ({p}-token prompt)", per * 1e3);
    Ok(())
}
