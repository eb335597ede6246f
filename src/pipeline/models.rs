//! The Stable Diffusion models a node serves, by name; the first is the default.
//!
//! Every model is loaded once at start, to be checked and described. With a bound on how many stay
//! in memory (`--max-loaded-models`), a request for one that is out loads it again: first the least
//! recently used other model is let go, then the load runs on a blocking thread. One load runs at a
//! time; tasks on the models already in memory never wait for it. A model let go while a task still
//! draws with it lives until that task ends.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One `--sd-model`: the name requests use and where the model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdModelSpec {
    /// The name requests give as `model`.
    pub name: String,
    /// A folder in optimum's ONNX layout (or one holding `cpu/` and `cuda/` exports), or
    /// `hf:REPO[@REVISION][:SUBFOLDER]`.
    pub source: PathBuf,
}

/// Why an `--sd-model` cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum BadSpec {
    /// The name before `=` is not one.
    #[error("model name {0:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")]
    Name(String),
    /// No name given, and none follows from the folder or repo.
    #[error("no model name follows from {0:?}; give one as NAME={0}")]
    NoName(String),
    /// Nothing after `=`.
    #[error("{0}= names no folder or hf: repo")]
    NoSource(String),
}

impl SdModelSpec {
    /// The name a source gets without `NAME=`: the repo's name for `hf:ORG/REPO…`, else the
    /// folder's own name.
    fn name_of(source: &str) -> Option<String> {
        let name = match source.strip_prefix(crate::hub::MODEL_PREFIX) {
            Some(repo) => repo.split([':', '@']).next()?.rsplit('/').next()?,
            None => Path::new(source).file_name()?.to_str()?,
        };
        is_name(name).then(|| name.to_string())
    }
}

fn is_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl FromStr for SdModelSpec {
    type Err = BadSpec;

    /// `NAME=SOURCE` or `SOURCE` (named after its folder or repo).
    fn from_str(spec: &str) -> Result<SdModelSpec, BadSpec> {
        let named = spec.split_once('=').filter(|(name, _)| !name.contains(['/', ':']));
        let (name, source) = match named {
            Some((name, _)) if !is_name(name) => return Err(BadSpec::Name(name.to_string())),
            Some((name, "")) => return Err(BadSpec::NoSource(name.to_string())),
            Some((name, source)) => (name.to_string(), source),
            None => (SdModelSpec::name_of(spec).ok_or_else(|| BadSpec::NoName(spec.to_string()))?, spec),
        };
        Ok(SdModelSpec { name, source: PathBuf::from(source) })
    }
}

impl fmt::Display for SdModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.source.display())
    }
}

/// Loads the model at an index of the pool's names; blocking.
pub type Load<M> = Arc<dyn Fn(usize) -> anyhow::Result<M> + Send + Sync>;

/// Named models, at most `max_loaded` of them in memory.
pub struct ModelPool<M> {
    names: Vec<String>,
    max_loaded: usize,
    table: Mutex<Table<M>>,
    /// Held while a model loads, so loads run one at a time and never overshoot the bound.
    loading: tokio::sync::Mutex<()>,
    load: Load<M>,
}

/// Which models are in memory, and when each was last asked for.
struct Table<M> {
    loaded: Vec<Option<Arc<M>>>,
    last_used: Vec<u64>,
    clock: u64,
}

impl<M: Send + Sync + 'static> ModelPool<M> {
    /// A pool of `names` with none in memory; `max_loaded` 0 means no bound.
    pub fn new(names: Vec<String>, max_loaded: usize, load: Load<M>) -> ModelPool<M> {
        let count = names.len();
        let max_loaded = if max_loaded == 0 { count } else { max_loaded };
        let table = Table { loaded: (0..count).map(|_| None).collect(), last_used: vec![0; count], clock: 0 };
        ModelPool { names, max_loaded, table: Mutex::new(table), loading: tokio::sync::Mutex::new(()), load }
    }

    /// The models' names, default first.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The index of the model named `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// How many models stay in memory at most.
    pub fn max_loaded(&self) -> usize {
        self.max_loaded
    }

    /// Keeps a model loaded at start in memory, as the most recently used one.
    pub fn keep(&self, index: usize, model: M) {
        let mut table = self.table.lock().expect("model table");
        table.touch(index);
        table.loaded[index] = Some(Arc::new(model));
    }

    /// The names of the models in memory now, in the pool's order.
    pub fn loaded(&self) -> Vec<String> {
        let table = self.table.lock().expect("model table");
        let loaded = table.loaded.iter().zip(&self.names).filter(|(model, _)| model.is_some());
        loaded.map(|(_, name)| name.clone()).collect()
    }

    /// The model at `index`, loading it first when it is out of memory.
    pub async fn get(&self, index: usize) -> anyhow::Result<Arc<M>> {
        if let Some(model) = self.lookup(index) {
            return Ok(model);
        }
        let _loading = self.loading.lock().await;
        if let Some(model) = self.lookup(index) {
            return Ok(model);
        }
        drop(self.make_room());
        let name = &self.names[index];
        let started = Instant::now();
        let load = self.load.clone();
        let model = tokio::task::spawn_blocking(move || load(index))
            .await
            .map_err(|e| anyhow::anyhow!("loading model {name} panicked: {e}"))??;
        let model = Arc::new(model);
        self.table.lock().expect("model table").loaded[index] = Some(model.clone());
        metrics::counter!("deskgen_sd_model_loads_total", "model" => name.clone()).increment(1);
        tracing::info!(model = %name, ms = started.elapsed().as_millis() as u64, "model loaded on demand");
        Ok(model)
    }

    /// The model at `index` if it is in memory, marked as just used.
    fn lookup(&self, index: usize) -> Option<Arc<M>> {
        let mut table = self.table.lock().expect("model table");
        table.touch(index);
        table.loaded[index].clone()
    }

    /// Lets go of the least recently used models until one more fits; returns them, to be dropped
    /// outside the table's lock.
    fn make_room(&self) -> Vec<Arc<M>> {
        let mut table = self.table.lock().expect("model table");
        let mut let_go = Vec::new();
        while table.loaded.iter().flatten().count() >= self.max_loaded {
            let oldest = (0..self.names.len())
                .filter(|&i| table.loaded[i].is_some())
                .min_by_key(|&i| table.last_used[i])
                .expect("a full pool holds a model");
            tracing::info!(model = %self.names[oldest], "model unloaded to make room");
            let_go.extend(table.loaded[oldest].take());
        }
        let_go
    }
}

impl<M> Table<M> {
    fn touch(&mut self, index: usize) {
        self.clock += 1;
        self.last_used[index] = self.clock;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A model that counts its live copies.
    struct Counted {
        index: usize,
        alive: Arc<AtomicUsize>,
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.alive.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Models a, b, gated (its load waits at `gate` when there is one) and broken (never loads).
    fn pool(
        max_loaded: usize,
        alive: &Arc<AtomicUsize>,
        loads: &Arc<AtomicUsize>,
        gate: Option<Arc<Barrier>>,
    ) -> ModelPool<Counted> {
        let (alive, loads) = (alive.clone(), loads.clone());
        let load: Load<Counted> = Arc::new(move |index| {
            if index == 3 {
                anyhow::bail!("model three is broken");
            }
            if let (2, Some(gate)) = (index, &gate) {
                gate.wait();
            }
            loads.fetch_add(1, Ordering::SeqCst);
            alive.fetch_add(1, Ordering::SeqCst);
            Ok(Counted { index, alive: alive.clone() })
        });
        ModelPool::new(["a", "b", "gated", "broken"].map(String::from).to_vec(), max_loaded, load)
    }

    #[test]
    fn a_model_is_named_by_the_flag_or_after_its_folder_or_repo() {
        let spec = |s: &str| s.parse::<SdModelSpec>().map(|m| (m.name, m.source.display().to_string()));
        assert_eq!(spec("turbo=models/sd-turbo").unwrap(), ("turbo".into(), "models/sd-turbo".into()));
        assert_eq!(spec("models/sd-turbo/").unwrap(), ("sd-turbo".into(), "models/sd-turbo/".into()));
        assert_eq!(spec("hf:org/sdxl-turbo@v1:onnx").unwrap().0, "sdxl-turbo");
        assert_eq!(spec("xl=hf:org/sdxl-turbo").unwrap(), ("xl".into(), "hf:org/sdxl-turbo".into()));
        assert!(matches!(spec("models/a=b").unwrap_err(), BadSpec::NoName(_)), "= inside a path is no name");
        assert_eq!(spec("ab=models/a=b").unwrap(), ("ab".into(), "models/a=b".into()));
        assert_eq!(
            spec("bad name=models/x").unwrap_err().to_string(),
            BadSpec::Name("bad name".into()).to_string()
        );
        assert!(matches!(spec("x=").unwrap_err(), BadSpec::NoSource(_)));
        assert!(matches!(spec("/").unwrap_err(), BadSpec::NoName(_)));
    }

    #[tokio::test]
    async fn the_least_recently_used_model_makes_room_and_comes_back_on_demand() {
        let (alive, loads) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let pool = pool(2, &alive, &loads, None);
        assert_eq!(pool.get(0).await.unwrap().index, 0);
        assert_eq!(pool.get(1).await.unwrap().index, 1);
        assert_eq!(pool.loaded(), ["a", "b"]);
        pool.get(0).await.unwrap();
        pool.get(2).await.unwrap();
        assert_eq!(pool.loaded(), ["a", "gated"], "b was the least recently used");
        assert_eq!(alive.load(Ordering::SeqCst), 2, "the model let go is freed");
        pool.get(1).await.unwrap();
        assert_eq!(pool.loaded(), ["b", "gated"]);
        assert_eq!(loads.load(Ordering::SeqCst), 4, "b was loaded again");
        pool.get(1).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 4, "a model in memory is not loaded again");
    }

    #[tokio::test]
    async fn a_model_in_use_outlives_its_unloading_and_a_failed_load_keeps_nothing() {
        let (alive, loads) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let pool = pool(1, &alive, &loads, None);
        let drawing = pool.get(0).await.unwrap();
        pool.get(1).await.unwrap();
        assert_eq!(pool.loaded(), ["b"]);
        assert_eq!(alive.load(Ordering::SeqCst), 2, "a's task still holds it");
        drop(drawing);
        assert_eq!(alive.load(Ordering::SeqCst), 1);
        let error = pool.get(3).await.err().expect("a broken model fails to load");
        assert_eq!(error.to_string(), "model three is broken");
        assert!(pool.loaded().is_empty());
        assert_eq!(pool.get(1).await.unwrap().index, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loading_one_model_does_not_hold_up_another() {
        let (alive, loads) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let gate = Arc::new(Barrier::new(2));
        let pool = Arc::new(pool(0, &alive, &loads, Some(gate.clone())));
        pool.get(0).await.unwrap();
        let gated = tokio::spawn({
            let pool = pool.clone();
            async move { pool.get(2).await.map(|m| m.index) }
        });
        // The gated load cannot finish until the gate opens below, after a has answered.
        let a = tokio::time::timeout(Duration::from_secs(10), pool.get(0)).await;
        assert_eq!(a.expect("a loaded model waited for another's load").unwrap().index, 0);
        assert!(!gated.is_finished());
        tokio::task::spawn_blocking(move || gate.wait()).await.unwrap();
        assert_eq!(gated.await.unwrap().unwrap(), 2);
        assert_eq!(pool.loaded(), ["a", "gated"], "no bound: both stay");
    }
}
