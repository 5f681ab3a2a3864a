//! A checkpoint that does not match its config is a clear error naming the tensor, never a
//! panic inside candle.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use ember_model_loader::config::HfConfig;
use ember_model_loader::weights::expected_tensors;
use ember_model_loader::{load, LoadError, LoadOptions, ModelRef};
use ember_tests::smollm_hf;

/// A tiny two-layer Llama directory with the real tokenizer, minus or plus the given damage.
fn tiny_model(dir: &std::path::Path, drop: Option<&str>, reshape: Option<&str>) -> anyhow::Result<()> {
    let config = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":49152,
        "rms_norm_eps":1e-5,"rope_theta":10000.0,"max_position_embeddings":256,"tie_word_embeddings":true}"#;
    std::fs::write(dir.join("config.json"), config)?;
    std::fs::copy(smollm_hf("f32")?.join("tokenizer.json"), dir.join("tokenizer.json"))?;
    let cfg = HfConfig::from_json(config)?.into_config()?;
    let mut tensors = HashMap::new();
    for (name, shape) in expected_tensors(&cfg) {
        if Some(name.as_str()) == drop {
            continue;
        }
        let shape = if Some(name.as_str()) == reshape { vec![shape[0] + 1, shape[1]] } else { shape };
        tensors.insert(name, Tensor::zeros(shape, DType::F32, &Device::Cpu)?);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

#[tokio::test]
async fn a_complete_tiny_model_loads() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    tiny_model(dir.path(), None, None)?;
    let loaded = load(&ModelRef::Local(dir.path().into()), &LoadOptions::default()).await?;
    assert_eq!(loaded.config().num_hidden_layers, 2);
    Ok(())
}

#[tokio::test]
async fn a_missing_tensor_is_named() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    tiny_model(dir.path(), Some("model.layers.1.mlp.up_proj.weight"), None)?;
    let err = load(&ModelRef::Local(dir.path().into()), &LoadOptions::default()).await.err();
    assert!(
        matches!(&err, Some(LoadError::MissingTensor { name }) if name == "model.layers.1.mlp.up_proj.weight"),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_misshapen_tensor_is_named_with_both_shapes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    tiny_model(dir.path(), None, Some("model.layers.0.self_attn.k_proj.weight"))?;
    let err = load(&ModelRef::Local(dir.path().into()), &LoadOptions::default()).await.err();
    let text = err.as_ref().map(ToString::to_string).unwrap_or_default();
    assert!(
        text.contains("model.layers.0.self_attn.k_proj.weight")
            && text.contains("[33, 64]")
            && text.contains("[32, 64]"),
        "{text}"
    );
    Ok(())
}
