//! The machine's compute devices: the CPU always, NVIDIA GPUs when the
//! binary is built with the `cuda` feature and a driver is present. The
//! driver is loaded dynamically, so the same binary runs where there is none.

use std::sync::Mutex;

use serde::Serialize;

/// What `GET /v1/devices` shows: every device, and why there is no GPU
/// when there is none.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceList {
    /// The devices, the CPU first.
    pub devices: Vec<DeviceInfo>,
    /// Whether this binary can use GPUs at all (the `cuda` feature).
    pub cuda_built: bool,
    /// Why no GPU is usable, when none is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cuda_unavailable: Option<String>,
}

/// One device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    /// `cpu` or `cuda:<ordinal>`, as models' `device` field names it.
    pub id: String,
    /// The product name.
    pub name: String,
    /// Total memory in bytes (the machine's for the CPU, when known).
    pub memory_total_bytes: u64,
    /// Free memory in bytes when it was discovered.
    pub memory_free_bytes: u64,
    /// What models may place on it, in bytes.
    pub budget_bytes: u64,
    /// What placed models' weights take, in bytes.
    pub used_bytes: u64,
}

/// Devices and the memory models have placed on them.
pub struct Devices {
    list: Mutex<DeviceList>,
}

impl Devices {
    /// Finds the devices. `gpu_budget` is the share of each GPU's free
    /// memory models may take (0..=1); `cpu_budget`, the bytes they may
    /// take in host memory (default: what was free).
    pub fn discover(gpu_budget: f64, cpu_budget: Option<u64>) -> Self {
        let (total, free) = host_memory();
        let mut devices = vec![DeviceInfo {
            id: "cpu".into(),
            name: format!(
                "{} ({} threads)",
                std::env::consts::ARCH,
                std::thread::available_parallelism().map_or(1, |n| n.get())
            ),
            memory_total_bytes: total,
            memory_free_bytes: free,
            budget_bytes: cpu_budget.unwrap_or(free),
            used_bytes: 0,
        }];
        let cuda_unavailable = match gpus() {
            Ok(gpus) if gpus.is_empty() => Some("the driver reports no CUDA device".to_string()),
            Ok(gpus) => {
                for gpu in gpus {
                    tracing::info!(
                        device = %gpu.id,
                        name = %gpu.name,
                        total_mib = gpu.memory_total_bytes >> 20,
                        free_mib = gpu.memory_free_bytes >> 20,
                        "found GPU"
                    );
                    devices.push(DeviceInfo {
                        budget_bytes: (gpu.memory_free_bytes as f64 * gpu_budget.clamp(0.0, 1.0))
                            as u64,
                        ..gpu
                    });
                }
                None
            }
            Err(why) => Some(why),
        };
        if let Some(why) = &cuda_unavailable {
            tracing::info!("no GPU: {why}; models run on the CPU");
        }
        Self {
            list: Mutex::new(DeviceList {
                devices,
                cuda_built: cfg!(feature = "cuda"),
                cuda_unavailable,
            }),
        }
    }

    /// The devices now.
    pub fn list(&self) -> DeviceList {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The first GPU with `bytes` left in its budget; `Err` says why none
    /// can take them.
    pub fn gpu_with_room(&self, bytes: u64) -> Result<String, String> {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = &list.cuda_unavailable {
            return Err(format!("no GPU: {why}"));
        }
        list.devices
            .iter()
            .filter(|d| d.id != "cpu")
            .find(|d| d.used_bytes + bytes <= d.budget_bytes)
            .map(|d| d.id.clone())
            .ok_or_else(|| {
                format!(
                    "no GPU has {} MiB left in its budget",
                    bytes.div_ceil(1 << 20)
                )
            })
    }

    /// Bytes left in device `id`'s budget (0 for an unknown device).
    pub fn room(&self, id: &str) -> u64 {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.devices
            .iter()
            .find(|d| d.id == id)
            .map_or(0, |d| d.budget_bytes.saturating_sub(d.used_bytes))
    }

    /// The usable GPUs' ids, in order.
    pub fn gpus(&self) -> Vec<String> {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if list.cuda_unavailable.is_some() {
            return Vec::new();
        }
        list.devices
            .iter()
            .filter(|d| d.id != "cpu")
            .map(|d| d.id.clone())
            .collect()
    }

    /// Records that a model of `bytes` left device `id`.
    pub fn release(&self, id: &str, bytes: u64) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(device) = list.devices.iter_mut().find(|d| d.id == id) {
            device.used_bytes = device.used_bytes.saturating_sub(bytes);
        }
    }

    /// Records a model of `bytes` placed on device `id`.
    pub fn place(&self, id: &str, bytes: u64) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(device) = list.devices.iter_mut().find(|d| d.id == id) {
            device.used_bytes += bytes;
        }
    }
}

/// Total and available memory from /proc/meminfo (0 where unknown).
fn host_memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib << 10)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

#[cfg(not(feature = "cuda"))]
fn gpus() -> Result<Vec<DeviceInfo>, String> {
    Err("this binary was built without the `cuda` feature".into())
}

#[cfg(feature = "cuda")]
fn gpus() -> Result<Vec<DeviceInfo>, String> {
    use cudarc::driver::{CudaContext, sys};
    if !culib_present() {
        return Err("no NVIDIA driver (libcuda) could be loaded".into());
    }
    // cudarc panics on a broken driver install; keep that to a reason.
    let probe = std::panic::catch_unwind(|| {
        let count = match CudaContext::device_count() {
            Ok(count) => count,
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => 0,
            Err(e) => return Err(format!("the CUDA driver failed: {e}")),
        };
        (0..count)
            .map(|ordinal| {
                let context = CudaContext::new(ordinal as usize)
                    .map_err(|e| format!("opening cuda:{ordinal}: {e}"))?;
                let name = context.name().map_err(|e| e.to_string())?;
                let (free, total) = context.mem_get_info().map_err(|e| e.to_string())?;
                Ok(DeviceInfo {
                    id: format!("cuda:{ordinal}"),
                    name,
                    memory_total_bytes: total as u64,
                    memory_free_bytes: free as u64,
                    budget_bytes: 0,
                    used_bytes: 0,
                })
            })
            .collect()
    });
    probe.unwrap_or_else(|_| Err("the CUDA driver panicked while listing devices".into()))
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn culib_present() -> bool {
    // SAFETY: only tries to dlopen libcuda by its usual names; it runs no
    // library code beyond the loader's and never panics.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_always_there_and_gpu_placement_says_why_not() {
        let devices = Devices::discover(0.9, None);
        let list = devices.list();
        assert_eq!(list.devices[0].id, "cpu");
        assert!(list.devices[0].memory_total_bytes > 0);
        if list.devices.len() == 1 {
            let why = list.cuda_unavailable.clone().expect("a reason");
            eprintln!("no GPU here: {why}");
            assert!(devices.gpu_with_room(1).unwrap_err().contains(&why));
        } else {
            let id = devices.gpu_with_room(1).unwrap();
            assert!(id.starts_with("cuda:"), "{id}");
        }
        devices.place("cpu", 1000);
        assert_eq!(devices.list().devices[0].used_bytes, 1000);
    }
}
