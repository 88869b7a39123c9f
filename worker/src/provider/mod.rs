//! Model providers: one trait with a streaming call, one implementation per kind of model.
//!
//! - [`mock`]: the built-in deterministic model.
//! - [`openai`]: OpenAI-compatible endpoints, over [`sse`].
//!
//! A provider turns a [`ChatRequest`] into a stream of [`StreamItem`]s: text deltas, then one
//! `Done` with the finish reason and usage. A stream that ends without `Done` is a failure.

pub mod mock;
pub mod openai;
pub mod sse;

use shared::metrics::ModelErrorKind;
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use futures_util::stream::BoxStream;
use serde_json::{Map, Value};
use shared::{config::ModelEndpoint, protocol::Usage};

/// One message of the conversation sent to the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: &'static str,
    /// Its text.
    pub content: String,
}

/// What the model is asked.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// Model name.
    pub model: String,
    /// System prompt, history and the new message, in order.
    pub messages: Vec<ChatMessage>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Upper bound on answer tokens.
    pub max_tokens: Option<u32>,
    /// Provider-specific options from the tenant's agent settings.
    pub options: Map<String, Value>,
}

/// One item of a model's answer stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// A piece of text, forwarded as one `message_stream_token`.
    Delta(String),
    /// The answer is complete.
    Done {
        /// `stop` or `length`.
        finish_reason: String,
        /// Token accounting, when the provider reports it.
        usage: Option<Usage>,
    },
}

/// Why a model call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// The tenant's agent names a provider this process does not have.
    #[error("unknown provider '{0}'")]
    UnknownProvider(String),
    /// The model failed (including the mock's `fail_after_tokens` drill).
    #[error("{0}")]
    Failed(String),
    /// The model took longer than its time limit.
    #[error("{0}")]
    Timeout(&'static str),
}

impl ProviderError {
    /// The failure's kind, as the `model_errors` metric labels it.
    pub fn kind(&self) -> ModelErrorKind {
        match self {
            Self::UnknownProvider(_) => ModelErrorKind::UnknownProvider,
            Self::Failed(_) => ModelErrorKind::Failed,
            Self::Timeout(_) => ModelErrorKind::Timeout,
        }
    }
}

/// The answer stream of one call.
pub type AnswerStream = BoxStream<'static, Result<StreamItem, ProviderError>>;

/// A kind of model.
pub trait Provider: Send + Sync + 'static {
    /// Starts answering; the stream is lazy and dropping it abandons the call.
    fn stream(&self, request: ChatRequest) -> AnswerStream;

    /// Whether the answer depends on the chat's earlier messages. A provider that ignores them
    /// (the `mock`) spares the store a read per answer.
    fn uses_history(&self) -> bool {
        true
    }

    /// The model a call asks for when the tenant names `requested` (an endpoint may supply a
    /// default for an empty name).
    fn model_for(&self, requested: &str) -> String {
        requested.to_owned()
    }

    /// Characters of earlier messages the provider accepts as context; `None`: no bound
    /// beyond the tenant's message count.
    fn context_budget(&self) -> Option<usize> {
        None
    }
}

/// Providers by the name tenants use in `agent.provider`.
#[derive(Clone)]
pub struct Providers(HashMap<String, Arc<dyn Provider>>);

impl Providers {
    /// The built-in set: just `mock`.
    pub fn builtin() -> Self {
        let mut map: HashMap<String, Arc<dyn Provider>> = HashMap::new();
        map.insert("mock".into(), Arc::new(mock::MockProvider));
        Self(map)
    }

    /// The built-in set plus one `openai` provider per configured endpoint (an endpoint whose
    /// client cannot be built is logged and left out).
    pub fn from_config(models: &BTreeMap<String, ModelEndpoint>) -> Self {
        let mut providers = Self::builtin();
        for (name, endpoint) in models {
            match openai::OpenAiProvider::new(name, endpoint.clone()) {
                Ok(p) => {
                    providers.0.insert(name.clone(), Arc::new(p));
                }
                Err(e) => tracing::error!(endpoint = %name, error = %e, "model endpoint left out"),
            }
        }
        providers
    }

    /// The provider named `name`.
    pub fn get(&self, name: &str) -> Result<Arc<dyn Provider>, ProviderError> {
        self.0
            .get(name)
            .cloned()
            .ok_or_else(|| ProviderError::UnknownProvider(name.to_owned()))
    }
}
