//! `ClipTextModel`: the CLIP text transformer (transformers' `CLIPTextModel`).

use lora_core::{Layer, LayerFactory};
use tch::{nn, Kind, Tensor};

use crate::clip::config::{ClipActivation, ClipTextConfig};
use crate::sd::attention::sdpa;
use crate::{Error, Result};

/// `self_attn`: `q_proj`, `k_proj`, `v_proj`, `out_proj` (all with bias), causal.
#[derive(Debug)]
struct ClipAttention {
    q_proj: Layer,
    k_proj: Layer,
    v_proj: Layer,
    out_proj: Layer,
    heads: i64,
}

/// `mlp`: `fc1`, activation, `fc2`.
#[derive(Debug)]
struct ClipMlp {
    fc1: Layer,
    fc2: Layer,
    act: ClipActivation,
}

/// One pre-norm encoder layer.
#[derive(Debug)]
struct ClipEncoderLayer {
    layer_norm1: nn::LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: nn::LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(vs: nn::Path<'_>, f: &dyn LayerFactory, c: &ClipTextConfig) -> Result<Self> {
        let d = c.hidden_size;
        let ln = nn::LayerNormConfig { eps: c.layer_norm_eps, ..Default::default() };
        let a = &vs / "self_attn";
        let m = &vs / "mlp";
        Ok(Self {
            layer_norm1: nn::layer_norm(&vs / "layer_norm1", vec![d], ln),
            self_attn: ClipAttention {
                q_proj: f.linear(&a / "q_proj", d, d, Default::default())?,
                k_proj: f.linear(&a / "k_proj", d, d, Default::default())?,
                v_proj: f.linear(&a / "v_proj", d, d, Default::default())?,
                out_proj: f.linear(&a / "out_proj", d, d, Default::default())?,
                heads: c.num_attention_heads,
            },
            layer_norm2: nn::layer_norm(&vs / "layer_norm2", vec![d], ln),
            mlp: ClipMlp {
                fc1: f.linear(&m / "fc1", d, c.intermediate_size, Default::default())?,
                fc2: f.linear(&m / "fc2", c.intermediate_size, d, Default::default())?,
                act: c.hidden_act,
            },
        })
    }

    /// # Shapes
    /// `[b, seq, hidden]` → `[b, seq, hidden]`.
    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let a = &self.self_attn;
        let h = xs.apply(&self.layer_norm1);
        let (q, k, v) = (
            a.q_proj.forward_t(&h, train),
            a.k_proj.forward_t(&h, train),
            a.v_proj.forward_t(&h, train),
        );
        let xs = a.out_proj.forward_t(&sdpa(&q, &k, &v, a.heads, true), train) + xs;
        let h = self.mlp.fc1.forward_t(&xs.apply(&self.layer_norm2), train);
        let h = match self.mlp.act {
            ClipActivation::QuickGelu => &h * (&h * 1.702).sigmoid(),
            ClipActivation::Gelu => h.gelu("none"),
        };
        self.mlp.fc2.forward_t(&h, train) + xs
    }
}

/// The outputs of [`ClipTextModel::forward`].
#[derive(Debug)]
pub struct ClipTextOutput {
    /// The hidden states after `clip_skip` (`[b, seq, hidden]`, final LayerNorm applied).
    pub hidden: Tensor,
    /// The final-layer state of the end-of-text token, final LayerNorm applied (`[b, hidden]`);
    /// only computed with `clip_skip = 1`, `None` otherwise.
    pub pooled: Option<Tensor>,
}

/// The outputs of [`ClipTextModel::forward_hidden_states`].
#[derive(Debug)]
pub struct ClipHiddenStates {
    /// The embeddings, then every layer's output (no final LayerNorm): `layers + 1` tensors.
    pub hidden_states: Vec<Tensor>,
    /// The last layer's output through the final LayerNorm.
    pub last_hidden_state: Tensor,
    /// `last_hidden_state` at the end-of-text token.
    pub pooled: Tensor,
}

/// The CLIP text encoder (transformers' `CLIPTextModel`), built under `text_model` so that
/// module paths equal the upstream keys (`text_model.encoder.layers.0.self_attn.q_proj`) and the
/// kohya names (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`).
#[derive(Debug)]
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: nn::LayerNorm,
}

impl ClipTextModel {
    /// Builds the text encoder under `vs / "text_model"` (pass the root of a dedicated
    /// `VarStore`).
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config; any error of the factory.
    pub fn new(vs: nn::Path<'_>, config: &ClipTextConfig, f: &dyn LayerFactory) -> Result<Self> {
        config.validate()?;
        let c = config;
        let vs = &vs / "text_model";
        let emb = &vs / "embeddings";
        let enc = &vs / "encoder" / "layers";
        Ok(Self {
            config: c.clone(),
            token_embedding: nn::embedding(
                &emb / "token_embedding",
                c.vocab_size,
                c.hidden_size,
                Default::default(),
            ),
            position_embedding: nn::embedding(
                &emb / "position_embedding",
                c.max_position_embeddings,
                c.hidden_size,
                Default::default(),
            ),
            layers: (0..c.num_hidden_layers)
                .map(|i| ClipEncoderLayer::new(&enc / i, f, c))
                .collect::<Result<Vec<_>>>()?,
            final_layer_norm: nn::layer_norm(
                &vs / "final_layer_norm",
                vec![c.hidden_size],
                nn::LayerNormConfig { eps: c.layer_norm_eps, ..Default::default() },
            ),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Encodes token ids.
    ///
    /// `clip_skip = 1` returns the last layer; `clip_skip = n` the output of layer `N - n`
    /// (transformers' `hidden_states[-n]`), through the final LayerNorm, as kohya and diffusers
    /// do. Layers after it are not run.
    ///
    /// # Shapes
    /// `input_ids: [b, seq]` (int64, `seq <= max_position_embeddings`) →
    /// `hidden: [b, seq, hidden]`, `pooled: [b, hidden]`.
    ///
    /// # Errors
    /// [`Error::Config`] when `clip_skip` is 0 or larger than the number of layers;
    /// [`Error::Shape`] when `input_ids` is not 2-D or longer than the position table.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        clip_skip: usize,
        train: bool,
    ) -> Result<ClipTextOutput> {
        let n = self.layers.len();
        if clip_skip == 0 || clip_skip > n {
            return Err(Error::Config {
                key: "clip_skip".into(),
                reason: format!("must be in 1..={n}, got {clip_skip}"),
            });
        }
        let mut xs = self.embed(input_ids)?;
        for layer in &self.layers[..n + 1 - clip_skip] {
            xs = layer.forward(&xs, train);
        }
        let hidden = xs.apply(&self.final_layer_norm);
        let pooled = (clip_skip == 1).then(|| self.pool(input_ids, &hidden));
        Ok(ClipTextOutput { hidden, pooled })
    }

    /// Every hidden state, as transformers' `output_hidden_states=True`: `hidden_states[0]` is
    /// the embeddings, `hidden_states[i]` the output of layer `i` (no final LayerNorm); plus
    /// the final-LayerNorm'd last state and its end-of-text pool.
    ///
    /// SDXL conditions on `hidden_states[-2]` of both encoders *without* the final LayerNorm
    /// (diffusers' SDXL pipeline, kohya's `strategy_sdxl`), which [`ClipTextModel::forward`]'s
    /// `clip_skip` (LayerNorm applied, as SD 1.x / 2.x) does not give.
    ///
    /// # Shapes
    /// `input_ids: [b, seq]` → `hidden_states: (layers + 1) × [b, seq, hidden]`,
    /// `last_hidden_state: [b, seq, hidden]`, `pooled: [b, hidden]`.
    ///
    /// # Errors
    /// [`Error::Shape`] as [`ClipTextModel::forward`].
    pub fn forward_hidden_states(
        &self,
        input_ids: &Tensor,
        train: bool,
    ) -> Result<ClipHiddenStates> {
        let mut xs = self.embed(input_ids)?;
        let mut hidden_states = vec![xs.shallow_clone()];
        for layer in &self.layers {
            xs = layer.forward(&xs, train);
            hidden_states.push(xs.shallow_clone());
        }
        let last_hidden_state = xs.apply(&self.final_layer_norm);
        let pooled = self.pool(input_ids, &last_hidden_state);
        Ok(ClipHiddenStates { hidden_states, last_hidden_state, pooled })
    }

    /// The end-of-text state of each row: the largest id's position with the legacy
    /// `eos_token_id = 2`, else the first `eos_token_id`.
    fn pool(&self, input_ids: &Tensor, hidden: &Tensor) -> Tensor {
        let b = input_ids.size()[0];
        let idx = if self.config.eos_token_id == 2 {
            input_ids.argmax(-1, false)
        } else {
            input_ids.eq(self.config.eos_token_id).to_kind(Kind::Int).argmax(-1, false)
        };
        hidden.index(&[Some(Tensor::arange(b, (Kind::Int64, hidden.device()))), Some(idx)])
    }

    /// Token plus position embeddings, after checking the ids' shape.
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let size = input_ids.size();
        let [_, seq] = size[..] else {
            return Err(Error::Shape {
                name: "input_ids".into(),
                expected: vec![-1, self.config.max_position_embeddings],
                actual: size,
            });
        };
        if seq > self.config.max_position_embeddings {
            return Err(Error::Shape {
                name: "input_ids".into(),
                expected: vec![-1, self.config.max_position_embeddings],
                actual: size,
            });
        }
        let positions = Tensor::arange(seq, (Kind::Int64, input_ids.device()));
        Ok(input_ids.apply(&self.token_embedding) + positions.apply(&self.position_embedding))
    }

    /// kohya's long-prompt encoding (`--max_token_length` 150 / 225, SD 1.x layout with pad =
    /// EOS): each 77-token chunk of [`ClipTokenizer::tokenize_chunks`](crate::ClipTokenizer::tokenize_chunks)
    /// is encoded on its own, then the states are joined as the first chunk's BOS state, the 75
    /// content states of every chunk in order, and the last chunk's final state
    /// (sd-scripts `train_util.get_hidden_states`).
    ///
    /// # Shapes
    /// `input_ids: [b, n, 77]` → `[b, 75·n + 2, hidden]` (`n = 1` gives the plain `[b, 77, hidden]`).
    ///
    /// # Errors
    /// As [`ClipTextModel::forward`]; [`Error::Shape`] unless `input_ids` is `[b, n, 77]`.
    pub fn forward_chunks(
        &self,
        input_ids: &Tensor,
        clip_skip: usize,
        train: bool,
    ) -> Result<Tensor> {
        let size = input_ids.size();
        let [b, n, 77] = size[..] else {
            return Err(Error::Shape {
                name: "input_ids".into(),
                expected: vec![-1, -1, 77],
                actual: size,
            });
        };
        let hidden = self.forward(&input_ids.reshape([b * n, 77]), clip_skip, train)?.hidden;
        let hidden = hidden.reshape([b, n * 77, -1]);
        if n == 1 {
            return Ok(hidden);
        }
        let mut parts = vec![hidden.narrow(1, 0, 1)];
        for j in 0..n {
            parts.push(hidden.narrow(1, j * 77 + 1, 75));
        }
        parts.push(hidden.narrow(1, n * 77 - 1, 1));
        Ok(Tensor::cat(&parts, 1))
    }
}
