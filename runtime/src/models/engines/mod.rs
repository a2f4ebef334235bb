//! Engines: what loads a model file onto a device. Each engine is one
//! module behind [`Engine`]; [`Engines`] is the registry that picks one
//! for a model (`engine = "auto"` or a name in `model.toml`), and
//! [`Engines::destination`] with [`Engines::load_on`] is the one placement
//! policy (auto/cpu/gpu within the devices' budgets) every engine goes
//! through.
//!
//! Adding an engine: a module here implementing [`Engine`] (and, for
//! tensor models, [`Graph`]), and one line in [`Engines::new`].

mod llama;
pub mod onnxruntime;
pub mod tract;

use std::path::Path;
use std::sync::Arc;

use super::config::{DevicePreference, ModelFormat};
use super::graph::Graph;
use crate::devices::Devices;
use crate::llm::{GenerationConfig, TextModel};

/// What an engine loaded.
#[derive(Clone)]
pub enum Loaded {
    /// A tensor graph, run through wasi-nn (and `embed`).
    Graph(Arc<dyn Graph>),
    /// A text model, run through `gigafactory:ai` `generate`.
    Text(Arc<TextModel>),
}

impl Loaded {
    /// Where it runs.
    pub fn device(&self) -> &str {
        match self {
            Loaded::Graph(graph) => graph.device(),
            Loaded::Text(text) => text.device(),
        }
    }

    /// What it takes in memory where it runs.
    pub fn memory_bytes(&self) -> u64 {
        match self {
            Loaded::Graph(graph) => graph.memory_bytes(),
            Loaded::Text(text) => text.memory_bytes(),
        }
    }
}

/// A model's bytes: a file in the repository, or a function's own bytes.
pub enum Data<'a> {
    /// A file.
    File(&'a Path),
    /// Bytes in memory.
    Bytes(&'a [u8]),
}

impl Data<'_> {
    /// Its size in bytes (0 when the file cannot be read).
    pub fn size(&self) -> u64 {
        match self {
            Data::File(path) => std::fs::metadata(path).map_or(0, |m| m.len()),
            Data::Bytes(bytes) => bytes.len() as u64,
        }
    }
}

/// What an engine loads from.
pub struct Source<'a> {
    /// The model's name, for logs (a hash for a function's own graph).
    pub name: &'a str,
    /// Its bytes.
    pub data: Data<'a>,
    /// Text models: their `[generation]` settings.
    pub generation: Option<&'a GenerationConfig>,
    /// Text models: the LoRA adapters to load with them.
    pub adapters: &'a [crate::llm::AdapterFile],
}

/// An engine: loads models of one format onto a device. Blocking; the pool
/// calls it on an inference worker.
pub trait Engine: Send + Sync {
    /// Its name in `model.toml` (`engine = "…"`) and in `GET /v1/models`.
    fn name(&self) -> &'static str;
    /// The format it loads.
    fn format(&self) -> ModelFormat;
    /// Why it cannot run here (its library is missing), if it cannot.
    fn unavailable(&self) -> Option<String> {
        None
    }
    /// Whether this build can place its models on GPUs, or why not.
    fn gpu_support(&self) -> Result<(), String> {
        Err(format!("the {} engine runs on the CPU only", self.name()))
    }
    /// Memory a model will take on `device` (`cpu` or `cuda:N`), estimated
    /// before loading it, to choose a device with room (default: the size
    /// of its bytes).
    fn estimate(&self, source: &Source, device: &str) -> Result<u64, String> {
        let _ = device;
        Ok(source.data.size())
    }
    /// Loads the model onto `device` (`cpu` or `cuda:N`).
    fn load(&self, source: &Source, device: &str) -> Result<Loaded, String>;
}

/// How the registry is set up (`serve` flags).
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// The ONNX Runtime library (`--onnxruntime`); else looked for.
    pub onnxruntime: Option<std::path::PathBuf>,
    /// The engine ONNX models with `engine = "auto"` and functions' own
    /// graphs use (`--onnx-engine`): `auto` (ONNX Runtime when its library
    /// is present, else tract), or an engine's name.
    pub onnx_engine: Option<String>,
    /// The engine functions' own `load`ed graphs run on
    /// (`--guest-onnx-engine`); default: what `onnx_engine` chose.
    pub guest_engine: Option<String>,
    /// Compute threads engines may use in all.
    pub threads: usize,
}

/// Every engine of this build.
pub struct Engines {
    engines: Vec<Arc<dyn Engine>>,
    /// The engine `auto` means for ONNX models.
    onnx_auto: Arc<dyn Engine>,
    /// The engine functions' own graphs run on.
    guest: Arc<dyn Engine>,
}

impl Engines {
    /// Registers the engines; fails only when a library the operator
    /// named does not load, or `--onnx-engine` names an unusable engine.
    pub fn new(options: &EngineOptions) -> anyhow::Result<Self> {
        let threads = options.threads.max(1);
        let engines: Vec<Arc<dyn Engine>> = vec![
            Arc::new(onnxruntime::OnnxRuntime::new(
                options.onnxruntime.as_deref(),
                threads,
            )?),
            Arc::new(tract::Tract),
            Arc::new(llama::LlamaCpp),
        ];
        let mut registry = Self {
            onnx_auto: engines[0].clone(),
            guest: engines[0].clone(),
            engines,
        };
        registry.onnx_auto = match options.onnx_engine.as_deref() {
            None | Some("auto") => registry.first_available(ModelFormat::Onnx),
            Some(name) => registry
                .named(ModelFormat::Onnx, name)
                .map_err(|e| anyhow::anyhow!("--onnx-engine: {e}"))?,
        };
        registry.guest = match options.guest_engine.as_deref() {
            None | Some("auto") => registry.onnx_auto.clone(),
            Some(name) => registry
                .named(ModelFormat::Onnx, name)
                .map_err(|e| anyhow::anyhow!("--guest-onnx-engine: {e}"))?,
        };
        tracing::info!(
            engine = registry.onnx_auto.name(),
            functions_own_graphs = registry.guest.name(),
            "ONNX models run on"
        );
        Ok(registry)
    }

    /// The first available engine of `format`, in registration order,
    /// saying why each one before it is not.
    fn first_available(&self, format: ModelFormat) -> Arc<dyn Engine> {
        let candidates = self.engines.iter().filter(|e| e.format() == format);
        let mut last = None;
        for engine in candidates {
            match engine.unavailable() {
                None => return engine.clone(),
                Some(why) => tracing::info!(engine = engine.name(), "engine not available: {why}"),
            }
            last = Some(engine.clone());
        }
        last.expect("every format has an engine")
    }

    fn named(&self, format: ModelFormat, name: &str) -> Result<Arc<dyn Engine>, String> {
        let engine = self
            .engines
            .iter()
            .find(|e| e.format() == format && e.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self
                    .engines
                    .iter()
                    .filter(|e| e.format() == format)
                    .map(|e| e.name())
                    .collect();
                format!(
                    "no engine {name:?} for {format:?} models (engines: auto, {})",
                    known.join(", ")
                )
            })?;
        match engine.unavailable() {
            Some(why) => Err(format!("engine {name:?}: {why}")),
            None => Ok(engine.clone()),
        }
    }

    /// The engine functions' own `load`ed ONNX graphs run on.
    pub fn for_guests(&self) -> Arc<dyn Engine> {
        self.guest.clone()
    }

    /// [`Self::choose`] for a tenant's private model when `private`: an
    /// ONNX graph a tenant supplies runs on the engine for functions' own
    /// graphs (`--guest-onnx-engine`), whatever it asks for.
    pub fn choose_for(
        &self,
        format: ModelFormat,
        engine: &str,
        private: bool,
    ) -> Result<Arc<dyn Engine>, String> {
        if !private || format != ModelFormat::Onnx {
            return self.choose(format, engine);
        }
        let guest = self.for_guests();
        if engine == "auto" || engine == guest.name() {
            Ok(guest)
        } else {
            Err(format!(
                "a tenant's ONNX model runs on {}, the engine for tenants' graphs here, not {engine:?}: \
                 say engine = \"auto\"",
                guest.name()
            ))
        }
    }

    /// The engine for a model of `format` asking for `engine` (`auto` or a name).
    pub fn choose(&self, format: ModelFormat, engine: &str) -> Result<Arc<dyn Engine>, String> {
        match (format, engine) {
            (ModelFormat::Onnx, "auto") => Ok(self.onnx_auto.clone()),
            (_, "auto") => Ok(self.first_available(format)),
            (_, name) => self.named(format, name),
        }
    }

    /// Where `source` goes with `engine`, and what it will take there:
    /// `auto` takes a GPU with room (or where `freeable` — what unloading
    /// unused models would give back on a device — makes room) when the
    /// engine runs on GPUs, else the CPU, saying why; `gpu` fails without
    /// one; `cpu` is the CPU.
    pub fn destination(
        engine: &dyn Engine,
        source: &Source,
        preference: DevicePreference,
        devices: &Devices,
        freeable: &dyn Fn(&str) -> u64,
    ) -> Result<(String, u64), String> {
        let device = match (preference, engine.gpu_support()) {
            (DevicePreference::Cpu, _) | (DevicePreference::Auto, Err(_)) => "cpu".to_string(),
            (DevicePreference::Gpu, Err(why)) => return Err(format!("device = \"gpu\": {why}")),
            (preference, Ok(())) => {
                let bytes = engine.estimate(source, "cuda:0")?;
                let roomy = devices.gpu_with_room(bytes).or_else(|why| {
                    devices
                        .gpus()
                        .into_iter()
                        .find(|gpu| devices.room(gpu) + freeable(gpu) >= bytes)
                        .ok_or(why)
                });
                match roomy {
                    Ok(gpu) => gpu,
                    Err(why) if preference == DevicePreference::Gpu => {
                        return Err(format!("device = \"gpu\": {why}"));
                    }
                    Err(why) => {
                        tracing::info!(model = %source.name, "device auto: on the CPU ({why})");
                        "cpu".to_string()
                    }
                }
            }
        };
        let bytes = engine.estimate(source, &device)?;
        Ok((device, bytes))
    }

    /// Loads `source` with `engine` onto `device` (from [`Self::destination`])
    /// and records what it takes there; with `auto`, a GPU that fails
    /// falls back to the CPU, saying why.
    pub fn load_on(
        engine: &dyn Engine,
        source: &Source,
        preference: DevicePreference,
        device: &str,
        devices: &Devices,
    ) -> Result<Loaded, String> {
        let loaded = match engine.load(source, device) {
            Ok(loaded) => loaded,
            Err(e) if preference == DevicePreference::Auto && device != "cpu" => {
                tracing::warn!(model = %source.name, "device auto: {device} failed ({e}); on the CPU");
                engine.load(source, "cpu")?
            }
            Err(e) if device != "cpu" => return Err(format!("placing on {device}: {e}")),
            Err(e) => return Err(e),
        };
        devices.place(loaded.device(), loaded.memory_bytes());
        Ok(loaded)
    }
}
