//! WasmEdge's GGML text ABI over the LLM engine: a repository text model
//! loaded by name (or by a manifest alias such as `default`), with
//! WasmEdge's options as JSON (`n-predict`, `temp`, `top-p`,
//! `repeat-penalty`, `presence-penalty`, `frequency-penalty`,
//! `reverse-prompt`, `seed`; the rest, such as `ctx-size` and
//! `n-gpu-layers`, are the model's own here and accepted as they come).
//! Input 0 is the prompt as written (the program applies its chat
//! template, as WasmEdge programs do), input 1 options for this context.
//! `compute` generates the whole answer: output 0 its text, output 1 its
//! usage as JSON. `compute_single` generates token by token (read with
//! `get_output_single`) until `end_of_sequence` (100); `fini_single`
//! ends it. Generations run on the model's continuous-batching scheduler
//! with every other tenant's, under the tenant's token quota.

use serde_json::{Map, Value};
use wasmtime::Caller;

use super::{Context, Errno, Outcome, give};
use crate::host::ModuleState;
use crate::llm::{self, Event, FinishReason, Generation, Prompt, Usage};
use crate::service::AiError;

/// Most tokens a generation runs to when the options set no `n-predict`
/// (or -1, WasmEdge's "until the context is full"): lowered to what the
/// model's context leaves.
const UNBOUNDED: u32 = u32::MAX / 2;

/// WasmEdge's GGML options, as far as they shape a generation.
#[derive(Debug, Clone, Default)]
pub(super) struct Options(Map<String, Value>);

impl Options {
    /// Options from the guest's JSON (empty: none); keys are WasmEdge's.
    pub(super) fn parse(json: &[u8]) -> Result<Self, Errno> {
        if json.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        match serde_json::from_slice(json) {
            Ok(Value::Object(map)) => {
                let options = Self(map);
                options.request().map(|_| options)
            }
            _ => Err(Errno::InvalidArgument),
        }
    }

    /// These options with `other`'s on top.
    fn with(&self, other: &Options) -> Options {
        let mut merged = self.0.clone();
        merged.extend(other.0.clone());
        Options(merged)
    }

    /// The generation these options ask for (the prompt set later).
    fn request(&self) -> Result<llm::Request, Errno> {
        let number = |key: &str| -> Result<Option<f64>, Errno> {
            match self.0.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(value) => value.as_f64().map(Some).ok_or(Errno::InvalidArgument),
            }
        };
        // WasmEdge's defaults: temperature 0.8, top-p 0.9, repeat penalty 1.1, seed 42.
        let mut request = llm::Request {
            temperature: number("temp")?.unwrap_or(0.8) as f32,
            top_p: number("top-p")?.unwrap_or(0.9) as f32,
            repeat_penalty: number("repeat-penalty")?.unwrap_or(1.1) as f32,
            presence_penalty: number("presence-penalty")?.unwrap_or(0.0) as f32,
            frequency_penalty: number("frequency-penalty")?.unwrap_or(0.0) as f32,
            seed: number("seed")?.map_or(42, |seed| seed as i64 as u32),
            max_tokens: match number("n-predict")? {
                None => UNBOUNDED,
                Some(n) if n < 0.0 => UNBOUNDED,
                Some(n) => (n as u32).max(1),
            },
            fit_context: true,
            ..llm::Request::default()
        };
        match self.0.get("reverse-prompt") {
            None | Some(Value::Null) => {}
            Some(Value::String(stop)) if !stop.is_empty() => request.stop = vec![stop.clone()],
            Some(Value::String(_)) => {}
            Some(_) => return Err(Errno::InvalidArgument),
        }
        let sane = (0.0..=2.0).contains(&request.temperature)
            && request.top_p > 0.0
            && request.top_p <= 1.0;
        if !sane {
            return Err(Errno::InvalidArgument);
        }
        Ok(request)
    }
}

/// A text model loaded by name, with the options it was loaded with.
#[derive(Debug, Clone)]
pub(crate) struct TextGraph {
    model: String,
    options: Options,
}

impl TextGraph {
    pub(super) fn new(model: String, options: Options) -> Self {
        Self { model, options }
    }
}

/// A text execution context.
pub(crate) struct Text {
    graph: TextGraph,
    prompt: Option<String>,
    options: Options,
    /// Bytes of inputs 0 and 1 held on the host.
    held: [usize; 2],
    /// The last whole answer (output 0) and its usage (output 1).
    answer: Option<(String, Usage)>,
    /// A token-by-token generation and its latest piece of text.
    single: Option<Generation>,
    piece: String,
    /// What the token-by-token generation has given so far, for its usage.
    streamed: Option<Usage>,
}

impl Text {
    pub(super) fn new(graph: TextGraph) -> Self {
        Self {
            graph,
            prompt: None,
            options: Options::default(),
            held: [0; 2],
            answer: None,
            single: None,
            piece: String::new(),
            streamed: None,
        }
    }

    /// Input 0: the prompt (UTF-8); input 1: options (JSON). Also says
    /// how many bytes the host no longer holds: the input replaced, or
    /// this one if refused.
    pub(super) fn set_input(&mut self, index: i32, data: Vec<u8>) -> (Result<(), Errno>, usize) {
        let length = data.len();
        let set = match index {
            0 => String::from_utf8(data)
                .map(|prompt| self.prompt = Some(prompt))
                .map_err(|_| Errno::InvalidArgument),
            1 => Options::parse(&data).map(|options| self.options = options),
            _ => Err(Errno::InvalidArgument),
        };
        match set {
            Ok(()) => {
                let slot = &mut self.held[index as usize];
                (Ok(()), std::mem::replace(slot, length))
            }
            Err(errno) => (Err(errno), length),
        }
    }

    /// Bytes of its inputs the host holds.
    pub(super) fn held(&self) -> usize {
        self.held.iter().sum()
    }

    /// Output 0: the answer's text; output 1: its usage as WasmEdge writes it.
    pub(super) fn output(&self, index: i32) -> Option<Vec<u8>> {
        let (text, usage) = self.answer.as_ref()?;
        match index {
            0 => Some(text.clone().into_bytes()),
            1 => Some(usage_json(usage)),
            _ => None,
        }
    }

    fn request(&self) -> Result<llm::Request, Errno> {
        let prompt = self.prompt.clone().ok_or(Errno::InvalidArgument)?;
        let mut request = self.graph.options.with(&self.options).request()?;
        request.prompt = Prompt::Text(prompt);
        Ok(request)
    }
}

fn usage_json(usage: &Usage) -> Vec<u8> {
    serde_json::json!({
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "llama_build_number": 0,
        "llama_commit": "",
    })
    .to_string()
    .into_bytes()
}

/// The text context `handle` of the caller.
fn text<'a>(caller: &'a mut Caller<'_, ModuleState>, handle: i32) -> Result<&'a mut Text, Errno> {
    match caller.data_mut().nn.contexts.get(handle)? {
        Context::Text(text) => Ok(text),
        Context::Tensor(_) => Err(Errno::UnsupportedOperation),
    }
}

/// Starts the context's generation on the model's scheduler.
async fn start(caller: &mut Caller<'_, ModuleState>, context: i32) -> Result<Generation, Errno> {
    let (model, request) = {
        let text = text(caller, context)?;
        (text.graph.model.clone(), text.request()?)
    };
    let service = caller.data().nn.ctx.service();
    service
        .generate(&model, request)
        .await
        .map_err(|error| match error {
            // WasmEdge's own number for a prompt the context cannot hold.
            AiError::TooLarge(_) => Errno::PromptTooLong,
            error => Errno::from(&error),
        })
}

/// The whole answer.
pub(super) async fn compute(mut caller: Caller<'_, ModuleState>, context: i32) -> Outcome {
    let generation = match start(&mut caller, context).await {
        Ok(generation) => generation,
        Err(errno) => return Ok(Err(errno)),
    };
    let answer = match generation.collect().await {
        Ok(answer) => answer,
        Err(error) => return Ok(Err(Errno::from(&error))),
    };
    match text(&mut caller, context) {
        Ok(text) => {
            text.answer = Some((answer.text, answer.usage));
            Ok(Ok(()))
        }
        Err(errno) => Ok(Err(errno)),
    }
}

/// The next piece of a token-by-token answer (started by the first call);
/// `end_of_sequence` when it is over.
pub(super) async fn compute_single(mut caller: Caller<'_, ModuleState>, context: i32) -> Outcome {
    let running = match text(&mut caller, context) {
        Ok(text) => text.single.take(),
        Err(errno) => return Ok(Err(errno)),
    };
    if running.is_none()
        && let Ok(text) = text(&mut caller, context)
        && text.streamed.is_some()
    {
        return Ok(Err(Errno::EndOfSequence));
    }
    let mut generation = match running {
        Some(generation) => generation,
        None => match start(&mut caller, context).await {
            Ok(generation) => generation,
            Err(errno) => return Ok(Err(errno)),
        },
    };
    let outcome = loop {
        match generation.next().await {
            Some(Event::Text(piece)) if !piece.is_empty() => break Ok(piece),
            Some(Event::Text(_) | Event::Token(_)) => {}
            Some(Event::Done(usage)) => break Err(Some(usage)),
            Some(Event::Failed(_)) | None => break Err(None),
        }
    };
    let Ok(text) = text(&mut caller, context) else {
        return Ok(Err(Errno::InvalidArgument));
    };
    match outcome {
        Ok(piece) => {
            text.piece = piece;
            text.single = Some(generation);
            let prompt_tokens = generation_prompt(text);
            let usage = text.streamed.get_or_insert(Usage {
                prompt_tokens,
                cached_tokens: 0,
                completion_tokens: 0,
                finish_reason: FinishReason::Length,
            });
            usage.completion_tokens += 1;
            Ok(Ok(()))
        }
        Err(Some(usage)) => {
            text.piece.clear();
            text.streamed = Some(usage);
            Ok(Err(Errno::EndOfSequence))
        }
        Err(None) => Ok(Err(Errno::RuntimeError)),
    }
}

fn generation_prompt(text: &Text) -> u32 {
    text.single.as_ref().map_or(0, Generation::prompt_tokens)
}

/// Output 0: the latest piece; output 1: the usage so far.
pub(super) fn get_output_single(
    caller: &mut Caller<'_, ModuleState>,
    context: i32,
    index: i32,
    buffer: i32,
    size: i32,
    written: i32,
) -> Outcome {
    let data = match text(caller, context) {
        Ok(text) => match index {
            0 => text.piece.clone().into_bytes(),
            1 => match &text.streamed {
                Some(usage) => usage_json(usage),
                None => return Ok(Err(Errno::InvalidArgument)),
            },
            _ => return Ok(Err(Errno::InvalidArgument)),
        },
        Err(errno) => return Ok(Err(errno)),
    };
    give(caller, &data, buffer, size, written)
}

/// Ends a token-by-token answer (its sequence leaves the batch at once).
pub(super) fn fini_single(caller: &mut Caller<'_, ModuleState>, context: i32) -> Outcome {
    match text(caller, context) {
        Ok(text) => {
            text.single = None;
            text.streamed = None;
            text.piece.clear();
            Ok(Ok(()))
        }
        Err(errno) => Ok(Err(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_held_on_the_host_are_counted_until_replaced() {
        let mut text = Text::new(TextGraph::new("m".into(), Options::default()));
        assert_eq!(text.set_input(0, b"hello".to_vec()), (Ok(()), 0));
        assert_eq!(text.set_input(0, b"hi".to_vec()), (Ok(()), 5));
        assert_eq!(text.set_input(1, b"{}".to_vec()), (Ok(()), 0));
        let refused = (Err(Errno::InvalidArgument), 4);
        assert_eq!(text.set_input(1, b"nope".to_vec()), refused);
        assert_eq!(
            text.set_input(2, b"x".to_vec()),
            (Err(Errno::InvalidArgument), 1)
        );
        assert_eq!(text.held(), 4);
    }

    #[test]
    fn wasmedge_options_shape_the_request() {
        let options = Options::parse(
            br#"{"n-predict": 16, "temp": 0, "top-p": 0.5, "reverse-prompt": "User:", "seed": 7, "ctx-size": 4096, "n-gpu-layers": 100}"#,
        )
        .unwrap();
        let request = options.request().unwrap();
        assert_eq!(request.max_tokens, 16);
        assert_eq!(request.temperature, 0.0);
        assert_eq!(request.top_p, 0.5);
        assert_eq!(request.stop, ["User:"]);
        assert_eq!(request.seed, 7);
        assert!(request.fit_context);
        let defaults = Options::default().request().unwrap();
        assert_eq!((defaults.temperature, defaults.seed), (0.8, 42));
        assert_eq!(defaults.max_tokens, UNBOUNDED);
        let overridden = options.with(&Options::parse(br#"{"n-predict": -1}"#).unwrap());
        assert_eq!(overridden.request().unwrap().max_tokens, UNBOUNDED);
        for bad in [
            &b"[1]"[..],
            b"{\"temp\": \"hot\"}",
            b"{\"temp\": 9}",
            b"not json",
        ] {
            assert_eq!(Options::parse(bad).unwrap_err(), Errno::InvalidArgument);
        }
    }
}
