//! The model repository: `DIR/<name>/jetbatch.toml` plus the model's files. Scanning reads every
//! config, checks it, and fingerprints the folder (config + every file) so cached results are never
//! served for other weights. [`ModelPlan::validate`] is the model-specific half of job parsing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;


use crate::job::{valid_model_name, Envelope, ErrorCode, JobError, ValidJob};
use crate::kinds::tensor::Slot;
use crate::kinds::{Model, ValidationError};
use crate::plan::{Backend, ModelConfig, ModelPlan};
use crate::tensor::DType;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// A folder past a bound of the fingerprint walk.
    #[error("{path}: {message}")]
    Walk { path: PathBuf, message: String },
    /// A `load` of a name that cannot be a model folder (quoted as an excerpt).
    #[error("model name '{name}' is not {rule}", rule = crate::job::MODEL_NAME_RULE)]
    BadName { name: String },
    /// A `load` of a name the repository has no folder for.
    #[error("{path}: no such model folder")]
    NoFolder { path: PathBuf },
}

impl RepoError {
    pub fn error_type(&self) -> &'static str {
        match self {
            RepoError::Io { .. } => "io",
            RepoError::Config { .. } => "config",
            RepoError::Walk { .. } => "walk",
            RepoError::BadName { .. } => "name",
            RepoError::NoFolder { .. } => "missing",
        }
    }
}

impl ModelPlan {
    pub fn load(dir: &Path) -> Result<ModelPlan, RepoError> {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let config_path = dir.join("jetbatch.toml");
        // A plain Hugging Face folder (config.json, no jetbatch.toml) is served with the defaults;
        // its errors name the folder, not a jetbatch.toml its owner never made.
        let plain_hf = !config_path.is_file() && dir.join("config.json").is_file();
        let err_path = if plain_hf { dir.to_path_buf() } else { config_path.clone() };
        let cfg_err = |message: String| RepoError::Config { path: err_path.clone(), message };
        if !valid_model_name(&name) {
            return Err(cfg_err(format!("model folder name '{name}' is not a model name ({})", crate::job::MODEL_NAME_RULE)));
        }
        let text = if plain_hf {
            PLAIN_HF_TOML.to_string()
        } else {
            std::fs::read_to_string(&config_path).map_err(|source| RepoError::Io { path: config_path.clone(), source })?
        };
        let config: ModelConfig = toml::from_str(&text).map_err(|e| cfg_err(e.to_string()))?;
        check_config(&config).map_err(cfg_err)?;
        if config.backend == Backend::Torchscript && !dir.join("model.pt").is_file() {
            return Err(cfg_err("backend torchscript needs model.pt beside jetbatch.toml".into()));
        }
        let lm = match config.backend {
            Backend::Hf => {
                let mut lm = crate::lm::LmSpec::load(dir, config.max_length, config.max_new_tokens_limit).map_err(cfg_err)?;
                lm.max_input_bytes = config.max_input_bytes.unwrap_or(crate::lm::DEFAULT_MAX_INPUT_BYTES);
                if let Some(t) = config.prefix_token {
                    if t as usize >= lm.config.vocab_size {
                        return Err(cfg_err(format!("prefix_token: {t} is not below the vocabulary size {}", lm.config.vocab_size)));
                    }
                    lm.prefix_token = t;
                }
                lm.add_bos = config.add_bos_token;
                Some(lm)
            }
            Backend::Torchscript => None,
        };
        let name = match &config.name {
            Some(n) if !valid_model_name(n) => {
                return Err(cfg_err(format!("name: '{}' is not a model name ({})", crate::error::excerpt(n), crate::job::MODEL_NAME_RULE)))
            }
            Some(n) => n.clone(),
            None => name,
        };
        let (fingerprint, size_bytes) = fingerprint(dir)?;
        Ok(ModelPlan { name: name.into(), dir: dir.to_path_buf(), config, fingerprint: fingerprint.into(), size_bytes, lm })
    }

    /// The model-specific half of parsing: turns an envelope into a [`ValidJob`]. The job's kind
    /// parses its `input` and `params` (see [`crate::kinds`]).
    pub fn validate(&self, env: Envelope, max_tensor_elements: usize) -> Result<ValidJob, JobError> {
        if !self.kinds().contains(&env.kind) {
            return Err(ValidationError::UnsupportedKind { model: self.name.to_string(), kind: env.kind }.into());
        }
        let model = match &self.lm {
            Some(lm) => Model::Lm { name: &self.name, lm },
            None => Model::Tensor { name: &self.name, slots: self.tensor_slots(), max_elements: max_tensor_elements },
        };
        let request = env.kind.validate(&model, &env.input, &env.params)?;
        Ok(ValidJob {
            id: env.id,
            model: self.name.clone(),
            kind: env.kind,
            input: request.input,
            // Result-affecting params are folded into the typed input, which the cache key covers.
            params: BTreeMap::new(),
            fingerprint: self.fingerprint.clone(),
            cost: request.cost,
            reply_to: env.reply_to,
            use_cache: env.use_cache && request.cacheable,
            stream: request.stream,
            timeout: env.timeout,
            deadline: env.deadline,
            encoding: env.encoding,
            priority: env.priority.unwrap_or_default(),
            chat: request.chat,
        })
    }

    /// A tensor model's inputs, as the `tensor` kind checks jobs against them.
    fn tensor_slots(&self) -> Vec<Slot<'_>> {
        self.config.inputs.iter().map(|s| Slot { name: &s.name, dtype: s.dtype, shape: &s.shape, max_len: s.max_len }).collect()
    }
}

fn check_config(c: &ModelConfig) -> Result<(), String> {
    if c.max_batch_size == 0 {
        return Err("max_batch_size: must be at least 1".into());
    }
    if let Some(d) = c.dtype {
        if ![DType::F32, DType::F16, DType::Bf16].contains(&d) {
            return Err("dtype: must be f32, f16 or bf16".into());
        }
    }
    if c.backend == Backend::Torchscript && c.inputs.is_empty() {
        return Err("inputs: a torchscript model lists its inputs ([[inputs]] name, dtype, shape)".into());
    }
    for (i, s) in c.inputs.iter().enumerate() {
        if s.shape.iter().any(|&d| d < -1) || s.max_len < 1 {
            return Err(format!("inputs[{i}].shape: sizes are >= 0, or -1 for a variable dim"));
        }
    }
    for (o, out) in c.outputs.iter().enumerate() {
        for t in &out.trim {
            let ok = c.inputs.get(t.input).is_some_and(|s| s.shape.get(t.input_dim) == Some(&-1));
            if !ok {
                return Err(format!("outputs[{o}].trim: input {} dim {} is not a variable dim", t.input, t.input_dim));
            }
        }
    }
    if c.lengths_input && !c.inputs.first().is_some_and(|s| s.shape.contains(&-1)) {
        return Err("lengths_input: input 0 has no variable dim".into());
    }
    Ok(())
}

/// How deep the fingerprint walk goes below a model folder, and how many files it reads: a model
/// folder is a handful of files, so a folder past these is a mistake (a whole tree mounted or
/// linked inside), named in the error rather than read for minutes.
const MAX_DEPTH: usize = 8;
const MAX_FILES: usize = 4096;

/// blake3 over the relative path and bytes of every file under `dir`, in sorted order. A link is
/// followed to a file (Hugging Face caches link every file to a blob) but never to a folder: `a
/// -> .` would walk the folder again and again.
fn fingerprint(dir: &Path) -> Result<(String, u64), RepoError> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), RepoError> {
        let walk_err = |message: String| RepoError::Walk { path: dir.to_path_buf(), message };
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(io(&path))?;
            if kind.is_dir() {
                if depth == MAX_DEPTH {
                    return Err(walk_err(format!("folders nested deeper than {MAX_DEPTH} in a model folder (every file of it is fingerprinted)")));
                }
                walk(&path, depth + 1, out)?;
            } else if !(kind.is_symlink() && path.is_dir()) {
                if out.len() == MAX_FILES {
                    return Err(walk_err(format!("more than {MAX_FILES} files in a model folder (every file of it is fingerprinted)")));
                }
                out.push(path);
            }
        }
        Ok(())
    }
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RepoError + '_ {
        move |source| RepoError::Io { path: path.to_path_buf(), source }
    }
    let mut files = Vec::new();
    walk(dir, 0, &mut files)?;
    files.sort();
    let mut hasher = blake3::Hasher::new();
    let mut size = 0;
    for file in &files {
        hasher.update(file.strip_prefix(dir).unwrap_or(file).to_string_lossy().as_bytes());
        hasher.update(&[0]);
        let f = std::fs::File::open(file).map_err(io(file))?;
        size += f.metadata().map_err(io(file))?.len();
        hasher.update_reader(f).map_err(io(file))?;
    }
    Ok((hasher.finalize().to_hex()[..16].to_string(), size))
}

/// The `jetbatch.toml` a Hugging Face folder without one is served with.
const PLAIN_HF_TOML: &str = "backend = \"hf\"\n";

/// "folder 'x'": where a model was read from, for messages.
fn folder_of(model: &ModelPlan) -> String {
    format!("folder '{}'", model.dir.file_name().unwrap_or_default().to_string_lossy())
}

/// All models of a repository folder, by the name jobs use (the folder's, or its `name`);
/// folders that fail to load are kept with their error, by folder name.
#[derive(Debug, Clone)]
pub struct Repository {
    pub dir: PathBuf,
    pub models: BTreeMap<String, Arc<ModelPlan>>,
    /// Model folders that cannot be served, and why: their jobs are answered with that reason.
    pub invalid: BTreeMap<String, Arc<RepoError>>,
    /// Entries that are not model folders (no `jetbatch.toml`, no `config.json`), and why.
    pub skipped: BTreeMap<String, String>,
}

impl Repository {
    pub fn scan(dir: &Path) -> Result<Repository, RepoError> {
        let io = |source| RepoError::Io { path: dir.to_path_buf(), source };
        let mut models: BTreeMap<String, Arc<ModelPlan>> = BTreeMap::new();
        let mut invalid = BTreeMap::new();
        let mut skipped = BTreeMap::new();
        let mut paths = std::fs::read_dir(dir).map_err(io)?.map(|e| e.map(|e| e.path())).collect::<Result<Vec<_>, _>>().map_err(io)?;
        // In name order, so that of two folders claiming one `name` the same one always wins.
        paths.sort();
        for path in paths {
            let name = path.file_name().unwrap_or_default().to_string_lossy().to_string();
            if !path.is_dir() {
                skipped.insert(name, "not a folder".to_string());
                continue;
            }
            if !path.join("jetbatch.toml").is_file() && !path.join("config.json").is_file() {
                skipped.insert(name, "neither jetbatch.toml nor a Hugging Face config.json".to_string());
                continue;
            }
            match ModelPlan::load(&path) {
                Ok(spec) => match models.get(spec.name.as_ref()) {
                    Some(taken) => {
                        let message = format!("name: '{}' is the name of {} too", spec.name, folder_of(taken));
                        invalid.insert(name, Arc::new(RepoError::Config { path: path.join("jetbatch.toml"), message }));
                    }
                    None => {
                        models.insert(spec.name.to_string(), Arc::new(spec));
                    }
                },
                Err(e) => {
                    invalid.insert(name, Arc::new(e));
                }
            }
        }
        Ok(Repository { dir: dir.to_path_buf(), models, invalid, skipped })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ModelPlan>> {
        self.models.get(name)
    }

    /// This repository with `name` read again from its folder, the other models untouched; and
    /// the outcome for `name`. A folder that reads is swapped in, added or in place of the version
    /// served, so its jobs never find the model missing. One that does not is kept as invalid
    /// with the reason, unless a version of it is served: that one stays (a reload swaps, it never
    /// drops). A name that is no folder of the repository is answered, not recorded: every
    /// made-up name would grow the repository and `info` with it. The folder is fingerprinted
    /// whole: call it off the async threads.
    pub fn reload(&self, name: &str) -> (Repository, Result<Arc<ModelPlan>, Arc<RepoError>>) {
        // A model served under a `name` of its own is read from its folder.
        let dir = self.models.get(name).map_or_else(|| self.dir.join(name), |m| m.dir.clone());
        if !valid_model_name(name) {
            return (self.clone(), Err(Arc::new(RepoError::BadName { name: crate::error::excerpt(name) })));
        }
        if !dir.is_dir() {
            return (self.clone(), Err(Arc::new(RepoError::NoFolder { path: dir })));
        }
        let mut next = self.clone();
        let outcome = match ModelPlan::load(&dir) {
            Ok(spec) if self.models.get(spec.name.as_ref()).is_some_and(|m| m.dir != spec.dir) => {
                let message = format!("name: '{}' is the name of {} too", spec.name, folder_of(&self.models[spec.name.as_ref()]));
                Err(Arc::new(RepoError::Config { path: dir.join("jetbatch.toml"), message }))
            }
            Ok(spec) => {
                let spec = Arc::new(spec);
                next.invalid.remove(name);
                next.skipped.remove(name);
                if next.models.get(name).is_some_and(|m| m.dir == spec.dir) {
                    next.models.remove(name); // its `name` may have changed
                }
                next.models.insert(spec.name.to_string(), spec.clone());
                Ok(spec)
            }
            Err(e) => {
                let e = Arc::new(e);
                if !next.models.contains_key(name) {
                    next.skipped.remove(name);
                    next.invalid.insert(name.to_string(), e.clone());
                }
                Err(e)
            }
        };
        (next, outcome)
    }

    /// This repository without `name` (served or invalid); `None` when it has no such model.
    pub fn without(&self, name: &str) -> Option<Repository> {
        let mut next = self.clone();
        let had = next.models.remove(name).is_some() | next.invalid.remove(name).is_some();
        had.then_some(next)
    }

    /// The model-specific half of parsing for any job: the model it names, and the job
    /// validated against it.
    pub fn admit(&self, env: Envelope, max_tensor_elements: usize) -> Result<(ValidJob, Arc<ModelPlan>), JobError> {
        let spec = self.get(&env.model).ok_or_else(|| self.unknown(&env.model))?;
        Ok((spec.validate(env, max_tensor_elements)?, spec.clone()))
    }

    /// The answer to a job for a model this repository does not serve.
    pub fn unknown(&self, model: &str) -> JobError {
        match self.invalid.get(model) {
            // The folder is there but cannot be served: say why, rather than that it is unknown.
            Some(why) => JobError::new(ErrorCode::ModelError, format!("model: '{model}' cannot be served by this worker: {why}")),
            None => JobError::new(ErrorCode::UnknownModel, format!("model: '{model}' is not in this worker's repository")),
        }
    }
}

/// The repository a running worker serves, swapped whole when a model is loaded or unloaded (the
/// `load`/`unload` endpoints); readers take the current one and keep it for the job at hand.
#[derive(Debug)]
pub struct LiveRepository(std::sync::RwLock<Arc<Repository>>);

impl LiveRepository {
    pub fn new(repository: Repository) -> LiveRepository {
        LiveRepository(std::sync::RwLock::new(Arc::new(repository)))
    }

    pub fn current(&self) -> Arc<Repository> {
        self.0.read().expect("repository lock").clone()
    }

    pub fn replace(&self, repository: Repository) {
        *self.0.write().expect("repository lock") = Arc::new(repository);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{decode, ErrorCode, JobKind, Limits};

    fn model(dir: &Path, name: &str, toml: &str) -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("jetbatch.toml"), toml).unwrap();
        std::fs::write(d.join("model.pt"), b"weights").unwrap();
        d
    }

    const SEQ: &str = r#"
backend = "torchscript"
[[inputs]]
name = "x"
dtype = "f32"
shape = [-1, 2]
max_len = 4
[[outputs]]
name = "y"
trim = [{ dim = 0, input = 0, input_dim = 0 }]
"#;

    #[test]
    fn scan_keeps_good_models_and_reports_bad_ones() {
        let tmp = tempfile::tempdir().unwrap();
        model(tmp.path(), "seq", SEQ);
        model(tmp.path(), "broken", "backend = \"onnx\"");
        model(tmp.path(), "badtrim", &SEQ.replace("input_dim = 0", "input_dim = 1"));
        let repo = Repository::scan(tmp.path()).unwrap();
        assert_eq!(repo.models.keys().collect::<Vec<_>>(), vec!["seq"]);
        assert_eq!(repo.invalid.len(), 2);
        assert!(repo.invalid["badtrim"].to_string().contains("not a variable dim"));
        let seq = &repo.models["seq"];
        assert_eq!((seq.config.max_batch_size, seq.config.max_wait_ms), (32, 5));
    }

    #[test]
    fn reload_adds_replaces_or_explains_one_model_and_keeps_the_others() {
        let tmp = tempfile::tempdir().unwrap();
        model(tmp.path(), "seq", SEQ);
        let repo = Repository::scan(tmp.path()).unwrap();
        let seq = repo.models["seq"].clone();
        model(tmp.path(), "late", SEQ);
        let (next, added) = repo.reload("late");
        assert_eq!(added.unwrap().name.as_ref(), "late");
        assert_eq!(next.models.keys().collect::<Vec<_>>(), vec!["late", "seq"]);
        assert!(Arc::ptr_eq(&next.models["seq"], &seq), "the other models are not read again");
        model(tmp.path(), "never", "backend = \"onnx\"");
        let (broken, why) = next.reload("never");
        assert!(why.unwrap_err().to_string().contains("onnx"));
        assert!(broken.get("never").is_none() && broken.invalid.contains_key("never"));
        assert!(broken.unknown("never").message.contains("onnx"), "its jobs say why");
        assert!(repo.reload("absent").1.unwrap_err().to_string().contains("no such model folder"));
        assert!(repo.reload("../seq").1.unwrap_err().to_string().contains("is not 1-64 of [A-Za-z0-9_.-]"));
        let gone = next.without("seq").unwrap();
        assert_eq!(gone.models.keys().collect::<Vec<_>>(), vec!["late"]);
        assert_eq!(gone.unknown("seq").code, ErrorCode::UnknownModel);
        assert!(gone.without("seq").is_none());
    }

    #[test]
    fn dotted_folder_names_and_a_name_key_are_served_and_errors_name_no_jetbatch_toml_never_made() {
        let tmp = tempfile::tempdir().unwrap();
        model(tmp.path(), "Qwen2.5-0.5B-Instruct", SEQ);
        model(tmp.path(), "qwen-folder", &format!("name = \"Qwen2.5-1.5B\"\n{SEQ}"));
        model(tmp.path(), "copy", &format!("name = \"Qwen2.5-1.5B\"\n{SEQ}"));
        model(tmp.path(), "bad-name", &format!("name = \"../x\"\n{SEQ}"));
        // A plain Hugging Face folder whose config.json does not read.
        let hf = tmp.path().join("Llama-3.2-1B");
        std::fs::create_dir_all(&hf).unwrap();
        std::fs::write(hf.join("config.json"), "{").unwrap();
        let repo = Repository::scan(tmp.path()).unwrap();
        assert_eq!(repo.models.keys().collect::<Vec<_>>(), vec!["Qwen2.5-0.5B-Instruct", "Qwen2.5-1.5B"]);
        assert_eq!(repo.models["Qwen2.5-1.5B"].dir.file_name().unwrap(), "copy", "the first folder in name order wins");
        let taken = repo.invalid["qwen-folder"].to_string();
        assert!(taken.contains("name: 'Qwen2.5-1.5B' is the name of folder 'copy' too"), "{taken}");
        assert!(repo.invalid["bad-name"].to_string().contains("name: '../x' is not a model name"));
        let hf_err = repo.invalid["Llama-3.2-1B"].to_string();
        assert!(!hf_err.contains("jetbatch.toml") && hf_err.contains("Llama-3.2-1B"), "{hf_err}");
        // A reload by the served name reads its folder.
        let (next, again) = repo.reload("Qwen2.5-1.5B");
        assert_eq!(again.unwrap().dir, repo.models["Qwen2.5-1.5B"].dir);
        assert_eq!(next.models.len(), 2);
    }

    #[test]
    fn a_reload_that_fails_keeps_the_served_version_and_names_without_a_folder_are_not_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = model(tmp.path(), "seq", SEQ);
        let repo = Repository::scan(tmp.path()).unwrap();
        let served = repo.models["seq"].clone();
        // Mid-edit: the folder does not read, the version already served goes on serving.
        std::fs::write(dir.join("jetbatch.toml"), "backend = \"onnx\"").unwrap();
        let (next, why) = repo.reload("seq");
        assert!(why.unwrap_err().to_string().contains("onnx"));
        assert!(Arc::ptr_eq(next.get("seq").expect("still served"), &served));
        assert!(next.invalid.is_empty(), "{:?}", next.invalid);
        // Names that are no folder of the repository are answered, never kept.
        let long = "x".repeat(100_000);
        for name in ["absent", long.as_str(), "../seq"] {
            let (next, why) = repo.reload(name);
            assert!(why.unwrap_err().to_string().len() < 400, "the error quotes an excerpt of the name");
            assert!(next.invalid.is_empty() && next.models.len() == 1, "{:?}", next.invalid.keys());
        }
    }

    #[test]
    fn a_symlink_loop_in_a_model_folder_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let d = model(tmp.path(), "seq", SEQ);
        let plain = ModelPlan::load(&d).unwrap();
        std::os::unix::fs::symlink(".", d.join("a")).unwrap();
        std::os::unix::fs::symlink("..", d.join("up")).unwrap();
        // A file reached through a link is read (Hugging Face caches link every file to a blob).
        std::fs::write(tmp.path().join("blob"), b"shared").unwrap();
        let looped = ModelPlan::load(&d).unwrap();
        assert_eq!((&looped.fingerprint, looped.size_bytes), (&plain.fingerprint, plain.size_bytes), "linked folders are left out");
        std::os::unix::fs::symlink(tmp.path().join("blob"), d.join("vocab.txt")).unwrap();
        let linked = ModelPlan::load(&d).unwrap();
        assert_eq!(linked.size_bytes, plain.size_bytes + 6);
        assert_ne!(linked.fingerprint, plain.fingerprint);
    }

    #[test]
    fn the_fingerprint_walk_is_bounded_and_says_which_folder_hit_the_bound() {
        let tmp = tempfile::tempdir().unwrap();
        let d = model(tmp.path(), "deep", SEQ);
        let bottom = (0..20).fold(d.clone(), |p, i| p.join(format!("d{i}")));
        std::fs::create_dir_all(&bottom).unwrap();
        let err = ModelPlan::load(&d).unwrap_err().to_string();
        assert!(err.contains("folders nested deeper than 8") && err.contains("deep/d0/d1/d2/d3/d4/d5/d6/d7"), "{err}");
        let d = model(tmp.path(), "many", SEQ);
        std::fs::create_dir(d.join("shards")).unwrap();
        for i in 0..4096 {
            std::fs::write(d.join("shards").join(i.to_string()), b"").unwrap();
        }
        let err = ModelPlan::load(&d).unwrap_err().to_string();
        assert!(err.contains("more than 4096 files") && err.contains("many"), "{err}");
    }

    #[test]
    fn fingerprint_changes_with_weights() {
        let tmp = tempfile::tempdir().unwrap();
        let d = model(tmp.path(), "seq", SEQ);
        let before = ModelPlan::load(&d).unwrap().fingerprint;
        assert_eq!(ModelPlan::load(&d).unwrap().fingerprint, before);
        std::fs::write(d.join("model.pt"), b"other weights").unwrap();
        let changed = ModelPlan::load(&d).unwrap();
        assert_ne!(changed.fingerprint, before);
        let toml_len = std::fs::metadata(d.join("jetbatch.toml")).unwrap().len();
        assert_eq!(changed.size_bytes, toml_len + b"other weights".len() as u64, "size is the files' bytes");
    }

    #[test]
    fn validate_checks_shapes_against_the_spec() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = ModelPlan::load(&model(tmp.path(), "seq", SEQ)).unwrap();
        let limits = Limits::new(1 << 20, 100);
        let job = |shape: &str, n: usize| {
            let data = vec!["0.5"; n].join(",");
            let s = format!(r#"{{"id":"j","model":"seq","kind":"tensor","input":{{"inputs":[{{"dtype":"f32","shape":{shape},"data":[{data}]}}]}}}}"#);
            spec.validate(decode(s.as_bytes(), None, "seq", &limits).unwrap(), 100)
        };
        let ok = job("[3,2]", 6).unwrap();
        assert_eq!(ok.cost, 6);
        let err = job("[5,2]", 10).unwrap_err();
        assert!(err.message.starts_with("input.inputs[0].shape"), "{}", err.message);
        assert!(job("[3,3]", 9).is_err());
        let gen = decode(br#"{"id":"g","model":"seq","kind":"generate","input":{}}"#, None, "seq", &limits).unwrap();
        assert_eq!(spec.validate(gen, 100).unwrap_err().code, ErrorCode::UnsupportedKind);
    }

    #[test]
    fn plain_hf_folders_are_served_and_other_entries_are_named_as_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let plain = tmp.path().join("plain-lm");
        jetbatch_testkit::write_tiny_lm(&plain, 3, 32, 1).unwrap();
        std::fs::remove_file(plain.join("jetbatch.toml")).unwrap();
        std::fs::create_dir_all(tmp.path().join("notes")).unwrap();
        std::fs::write(tmp.path().join("README.txt"), "hello").unwrap();
        let broken = tmp.path().join("broken");
        std::fs::create_dir_all(&broken).unwrap();
        std::fs::write(broken.join("config.json"), r#"{"architectures": ["NoSuchForCausalLM"]}"#).unwrap();
        let repo = Repository::scan(tmp.path()).unwrap();
        let spec = repo.get("plain-lm").expect("a config.json folder is served with defaults");
        assert_eq!(spec.config.backend, Backend::Hf);
        assert!(spec.kinds().contains(&JobKind::Generate));
        assert!(repo.invalid.contains_key("broken"), "a folder that cannot be served is reported, not dropped");
        assert_eq!(repo.skipped.keys().map(String::as_str).collect::<Vec<_>>(), vec!["README.txt", "notes"]);
        // jetbatch.toml may name the prefix token; it must be in the vocabulary.
        std::fs::write(plain.join("jetbatch.toml"), "backend = \"hf\"\nprefix_token = 2\n").unwrap();
        assert_eq!(ModelPlan::load(&plain).unwrap().lm.unwrap().prefix_token, 2);
        std::fs::write(plain.join("jetbatch.toml"), "backend = \"hf\"\nprefix_token = 100000\n").unwrap();
        assert!(ModelPlan::load(&plain).unwrap_err().to_string().contains("prefix_token"));
    }
}
