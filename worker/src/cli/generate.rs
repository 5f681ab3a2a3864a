//! `ember generate`: one prompt, one completion, printed as it is made (or as an OpenAI
//! chat.completion object with `--json`).

use std::io::Write;
use std::sync::atomic::AtomicBool;

use ember_model_loader::Message;

use super::common::{AwsArgs, ModelArgs};
use crate::openai::{completion_body, unix_now};
use crate::telemetry::since_process_start;
use ember_engine::{Engine, GenerateRequest, Prompt, SamplingParams};

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub aws: AwsArgs,
    /// The user message.
    #[arg(long, env = "EMBER_PROMPT")]
    pub prompt: String,
    /// A system message before the prompt.
    #[arg(long, env = "EMBER_SYSTEM")]
    pub system: Option<String>,
    /// Send the prompt as it is, without the chat template.
    #[arg(long, env = "EMBER_RAW", value_parser = clap::builder::BoolishValueParser::new())]
    pub raw: bool,
    #[arg(long, env = "EMBER_MAX_TOKENS", default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, env = "EMBER_TEMPERATURE", allow_negative_numbers = true, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, env = "EMBER_TOP_P", allow_negative_numbers = true, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 disables the top-k cut.
    #[arg(long, env = "EMBER_TOP_K", default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, env = "EMBER_REPETITION_PENALTY", allow_negative_numbers = true, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, env = "EMBER_SEED")]
    pub seed: Option<u64>,
    /// Stop before this text (repeatable).
    #[arg(long, env = "EMBER_STOP")]
    pub stop: Vec<String>,
    /// Print the OpenAI chat.completion object instead of the text.
    #[arg(long, env = "EMBER_JSON", value_parser = clap::builder::BoolishValueParser::new())]
    pub json: bool,
}

pub async fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    // Bad settings fail before the model is loaded, not after.
    sampling.validate()?;
    let loaded = args.model.load(&args.aws).await?;
    let load_done = since_process_start();
    crate::telemetry::metrics::cold_start(&crate::telemetry::metrics::ColdStart {
        model: &loaded.name,
        timings: &loaded.timings,
        ready_s: load_done,
    });
    let engine = Engine::new(loaded);
    let prompt = if args.raw {
        Prompt::Text(args.prompt.clone())
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &args.prompt));
        Prompt::Chat(messages)
    };
    let req = GenerateRequest {
        allow_special_tokens: false,
        prompt_ids: None,
        prompt,
        max_tokens: args.max_tokens,
        sampling,
        stop: args.stop.clone(),
    };
    // Text goes out as it is made, unless the whole object is wanted.
    let mut stdout = std::io::stdout().lock();
    let mut printed = 0;
    let mut print = |piece: &str| {
        printed += piece.len();
        let _ = stdout.write_all(piece.as_bytes()).and_then(|()| stdout.flush());
    };
    let mut quiet = |_: &str| {};
    let on_text: &mut dyn FnMut(&str) = if args.json { &mut quiet } else { &mut print };
    let done = tokio::task::block_in_place(|| engine.generate_streaming(&req, &AtomicBool::new(false), on_text))?;
    let t = done.timings;
    let decode_tokens = done.usage.completion_tokens.saturating_sub(1);
    tracing::info!(
        model = %engine.loaded.name,
        prompt_tokens = done.usage.prompt_tokens,
        completion_tokens = done.usage.completion_tokens,
        load_s = load_done,
        first_token_s = load_done + t.prefill_s,
        prefill_tok_s = done.usage.prompt_tokens as f64 / t.prefill_s.max(1e-9),
        decode_tok_s = decode_tokens as f64 / t.decode_s.max(1e-9),
        "generation finished"
    );
    if args.json {
        let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
        let body = completion_body(&id, &engine.loaded.name, unix_now(), !args.raw, &done);
        println!("{body}");
    } else {
        // What a stop sequence held back until the end.
        let rest = done.text.get(printed..).unwrap_or_default();
        let _ = writeln!(stdout, "{rest}").and_then(|()| stdout.flush());
    }
    Ok(())
}
