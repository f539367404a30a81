//! Workload files: which jobs to send, in what mix, with what sizes.
//!
//! A workload (TOML or JSON, chosen by the file's extension) is a weighted mix of job templates.
//! Each job is drawn from the mix, its sizes from the template's distributions, and with
//! probability `duplicate_ratio` it repeats the input of an earlier job under a new id (a cache
//! hit for a worker with a cache). Fields are the job schema's (`schemas/job.schema.json`):
//! `params`, `cache` and `timeout_ms` are copied into every job as given, so the worker reads
//! them exactly as it would from any producer.
//!
//! ```toml
//! encoding = "msgpack"        # or "json"
//! duplicate_ratio = 0.25
//! seed = 7
//!
//! [[mix]]                     # a fixed-shape tensor job
//! model = "mlp"
//! kind = "tensor"
//! weight = 3
//! shape = [16]
//!
//! [[mix]]                     # a sequence of 4..64 rows of 8
//! model = "seqproj"
//! kind = "tensor"
//! shape = [{ uniform = [4, 64] }, 8]
//!
//! [[mix]]                     # multiple choice: 4 jobs in a row with the same context
//! model = "lm"
//! kind = "loglikelihood"
//! context_words = { uniform = [6, 24] }
//! continuation_words = { choice = [1, 2, 3] }
//! choices = 4
//!
//! [[mix]]                     # 3 short generations to 1 long one
//! model = "tiny-lm"
//! kind = "generate"
//! prompt_words = { uniform = [2, 12] }
//! max_new_tokens = { choice = [8, 8, 8, 128] }
//! params = { temperature = 0.0 }
//! ```

use std::path::Path;

use jetbatch::job::{Encoding, JobKind};
use rmpv::Value;
use serde::{Deserialize, Serialize};

/// A length: a number, `{ uniform = [lo, hi] }` (inclusive), `{ normal = [mean, std] }` (rounded,
/// at least 1) or `{ choice = [a, b, …] }` (each equally likely; repeat a value to weight it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dist {
    Fixed(u64),
    Uniform { uniform: [u64; 2] },
    Normal { normal: [f64; 2] },
    Choice { choice: Vec<u64> },
}

impl Dist {
    fn check(&self, field: &str) -> Result<(), String> {
        match self {
            Dist::Uniform { uniform: [lo, hi] } if lo > hi => Err(format!("{field}: uniform [{lo}, {hi}] has lo > hi")),
            Dist::Normal { normal: [mean, std] } if !(mean.is_finite() && std.is_finite() && *std >= 0.0) => {
                Err(format!("{field}: normal needs a finite mean and std >= 0"))
            }
            Dist::Choice { choice } if choice.is_empty() => Err(format!("{field}: choice is empty")),
            _ => Ok(()),
        }
    }

    pub fn sample(&self, rng: &mut Rng) -> u64 {
        match self {
            Dist::Fixed(n) => *n,
            Dist::Uniform { uniform: [lo, hi] } => lo + rng.below(hi - lo + 1),
            Dist::Normal { normal: [mean, std] } => (mean + std * rng.normal()).round().max(1.0) as u64,
            Dist::Choice { choice } => choice[rng.below(choice.len() as u64) as usize],
        }
    }
}

/// One entry of the mix: a model, a kind and the shape of its inputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub model: String,
    pub kind: String,
    /// Relative frequency in the mix.
    #[serde(default = "one")]
    pub weight: f64,
    /// `tensor`: the input's shape, one length per dimension.
    #[serde(default)]
    pub shape: Vec<Dist>,
    /// `tensor`: element type (`f32`, `f64`, `i64`, …).
    #[serde(default = "f32_name")]
    pub dtype: String,
    /// `generate`: words in the prompt.
    pub prompt_words: Option<Dist>,
    /// `generate`: `params.max_new_tokens`.
    pub max_new_tokens: Option<Dist>,
    /// `loglikelihood`: words of context and of continuation.
    pub context_words: Option<Dist>,
    pub continuation_words: Option<Dist>,
    /// `loglikelihood`: jobs drawn as groups of this many in a row that share one context (a
    /// multiple-choice question as lm-evaluation-harness sends it: one job per option).
    pub choices: Option<u64>,
    /// `loglikelihood_rolling`, `embed`, `classify`: words of text.
    pub text_words: Option<Dist>,
    /// Copied into every job (`params` of the job schema); `max_new_tokens` above wins.
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// The job's `cache` flag (default: the worker's default, true).
    pub cache: Option<bool>,
    pub timeout_ms: Option<u64>,
}

fn one() -> f64 {
    1.0
}

fn f32_name() -> String {
    "f32".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// `msgpack` (the default, tensors as binary) or `json`.
    #[serde(default = "msgpack_name")]
    pub encoding: String,
    /// Share of jobs that repeat an earlier job's input with a new id.
    #[serde(default)]
    pub duplicate_ratio: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub mix: Vec<Template>,
}

fn msgpack_name() -> String {
    "msgpack".into()
}

fn default_seed() -> u64 {
    1
}

impl Workload {
    pub fn load(path: &Path) -> Result<Workload, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let w: Workload = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        } else {
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        };
        w.check().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(w)
    }

    /// A one-template workload of fixed-shape tensor jobs (the benchmarks' default).
    pub fn tensor(model: &str, shape: &[u64], duplicate_ratio: f64) -> Workload {
        let mut t = Template::new(model, "tensor");
        t.shape = shape.iter().map(|&n| Dist::Fixed(n)).collect();
        Workload { encoding: msgpack_name(), duplicate_ratio, seed: default_seed(), mix: vec![t] }
    }

    pub fn encoding(&self) -> Encoding {
        if self.encoding == "json" {
            Encoding::Json
        } else {
            Encoding::MsgPack
        }
    }

    fn check(&self) -> Result<(), String> {
        if !matches!(self.encoding.as_str(), "msgpack" | "json") {
            return Err(format!("encoding: '{}' is neither msgpack nor json", self.encoding));
        }
        if !(0.0..=1.0).contains(&self.duplicate_ratio) {
            return Err("duplicate_ratio: must be within [0, 1]".into());
        }
        if self.mix.is_empty() {
            return Err("mix: at least one job template is needed".into());
        }
        for (i, t) in self.mix.iter().enumerate() {
            t.check().map_err(|e| format!("mix[{i}].{e}"))?;
        }
        Ok(())
    }
}

impl Template {
    pub fn new(model: &str, kind: &str) -> Template {
        Template {
            model: model.into(),
            kind: kind.into(),
            weight: 1.0,
            shape: vec![],
            dtype: f32_name(),
            prompt_words: None,
            max_new_tokens: None,
            context_words: None,
            continuation_words: None,
            choices: None,
            text_words: None,
            params: Default::default(),
            cache: None,
            timeout_ms: None,
        }
    }

    fn check(&self) -> Result<(), String> {
        if !jetbatch::job::valid_model_name(&self.model) {
            return Err(format!("model: '{}' is not a valid model name", self.model));
        }
        let kind = JobKind::parse(&self.kind).ok_or_else(|| format!("kind: unknown kind '{}'", self.kind))?;
        if !(self.weight.is_finite() && self.weight > 0.0) {
            return Err("weight: must be > 0".into());
        }
        let need = |d: &Option<Dist>, name: &str| match d {
            Some(d) => d.check(name),
            None => Err(format!("{name}: required for kind '{}'", self.kind)),
        };
        match kind {
            JobKind::Tensor => {
                if self.shape.is_empty() {
                    return Err("shape: required for kind 'tensor'".into());
                }
                if !matches!(self.dtype.as_str(), "f32" | "f64" | "i64" | "i32") {
                    return Err(format!("dtype: '{}' is not generated (f32, f64, i64, i32)", self.dtype));
                }
                self.shape.iter().try_for_each(|d| d.check("shape"))
            }
            JobKind::Generate => {
                need(&self.prompt_words, "prompt_words")?;
                self.max_new_tokens.as_ref().map_or(Ok(()), |d| d.check("max_new_tokens"))
            }
            JobKind::Loglikelihood => {
                need(&self.context_words, "context_words")?;
                if self.choices == Some(0) {
                    return Err("choices: must be at least 1".into());
                }
                need(&self.continuation_words, "continuation_words")
            }
            JobKind::LoglikelihoodRolling | JobKind::Embed | JobKind::Classify => need(&self.text_words, "text_words"),
        }
    }

    /// The `input` and `params` of the next jobs (one, or `choices` sharing a context) with sizes
    /// drawn from `rng`.
    fn draw(&self, rng: &mut Rng, encoding: Encoding) -> Vec<(Value, Value)> {
        let words = |d: &Option<Dist>, rng: &mut Rng| text(d.as_ref().map_or(1, |d| d.sample(rng)), rng);
        let mut params: Vec<(Value, Value)> =
            self.params.iter().map(|(k, v)| (Value::from(k.as_str()), json_to_value(v))).collect();
        let input = match self.kind.as_str() {
            "tensor" => {
                let shape: Vec<u64> = self.shape.iter().map(|d| d.sample(rng)).collect();
                map(vec![("inputs", Value::Array(vec![tensor(&self.dtype, &shape, rng, encoding)]))])
            }
            "generate" => {
                if let Some(d) = &self.max_new_tokens {
                    params.retain(|(k, _)| k.as_str() != Some("max_new_tokens"));
                    params.push(("max_new_tokens".into(), d.sample(rng).into()));
                }
                map(vec![("prompt", words(&self.prompt_words, rng).into())])
            }
            "loglikelihood" => {
                let context = words(&self.context_words, rng);
                let params = Value::Map(params);
                return (0..self.choices.unwrap_or(1))
                    .map(|_| {
                        let continuation = format!(" {}", words(&self.continuation_words, rng));
                        (map(vec![("context", context.as_str().into()), ("continuation", continuation.into())]), params.clone())
                    })
                    .collect();
            }
            _ => map(vec![("text", words(&self.text_words, rng).into())]),
        };
        vec![(input, Value::Map(params))]
    }
}

/// A job ready to publish.
pub struct Job {
    pub model: String,
    pub body: bytes::Bytes,
}

/// Draws jobs from a workload, deterministically for a seed.
pub struct Generator {
    workload: Workload,
    rng: Rng,
    total_weight: f64,
    /// Earlier jobs' (template index, input, params), for duplicates.
    earlier: Vec<(usize, Value, Value)>,
    /// The rest of a group drawn together (multiple-choice options), sent next in this order.
    group: std::collections::VecDeque<(usize, Value, Value)>,
}

/// Earlier inputs kept for duplicates: enough for a long run's hit pattern, bounded in memory.
const EARLIER_KEPT: usize = 4096;

impl Generator {
    pub fn new(workload: Workload) -> Generator {
        let total_weight = workload.mix.iter().map(|t| t.weight).sum();
        let rng = Rng::new(workload.seed);
        Generator { workload, rng, total_weight, earlier: Vec::new(), group: Default::default() }
    }

    pub fn encoding(&self) -> Encoding {
        self.workload.encoding()
    }

    /// From now on, this share of jobs repeats earlier inputs (1.0 after a warm-up: only hits).
    pub fn set_duplicate_ratio(&mut self, ratio: f64) {
        self.workload.duplicate_ratio = ratio;
    }

    pub fn next(&mut self, id: String) -> Job {
        let encoding = self.workload.encoding();
        let (index, input, params) = if let Some(next) = self.group.pop_front() {
            next
        } else if !self.earlier.is_empty() && self.rng.unit() < self.workload.duplicate_ratio {
            self.earlier[self.rng.below(self.earlier.len() as u64) as usize].clone()
        } else {
            let mut pick = self.rng.unit() * self.total_weight;
            let index = self.workload.mix.iter().position(|t| {
                pick -= t.weight;
                pick < 0.0
            });
            let index = index.unwrap_or(self.workload.mix.len() - 1);
            let mut drawn = self.workload.mix[index].draw(&mut self.rng, encoding).into_iter();
            let (input, params) = drawn.next().expect("a template draws at least one job");
            self.group.extend(drawn.map(|(i, p)| (index, i, p)));
            if self.earlier.len() < EARLIER_KEPT {
                self.earlier.push((index, input.clone(), params.clone()));
            } else {
                let slot = self.rng.below(EARLIER_KEPT as u64) as usize;
                self.earlier[slot] = (index, input.clone(), params.clone());
            }
            (index, input, params)
        };
        let t = &self.workload.mix[index];
        let mut fields = vec![
            ("id", Value::from(id.as_str())),
            ("model", Value::from(t.model.as_str())),
            ("kind", Value::from(t.kind.as_str())),
            ("input", input),
        ];
        if params.as_map().is_some_and(|m| !m.is_empty()) {
            fields.push(("params", params));
        }
        if let Some(c) = t.cache {
            fields.push(("cache", c.into()));
        }
        if let Some(ms) = t.timeout_ms {
            fields.push(("timeout_ms", ms.into()));
        }
        let body = encode(&map(fields), encoding);
        Job { model: t.model.clone(), body: body.into() }
    }
}

impl Job {
    /// The job's `input` fields and `params` in one JSON object (`{"context": …, "continuation":
    /// …}`, `{"prompt": …, "max_new_tokens": …}`): the line a script outside the bus reads.
    pub fn input_and_params(&self) -> serde_json::Value {
        let job = if self.body.first() == Some(&b'{') {
            serde_json::from_slice(&self.body).unwrap_or_default()
        } else {
            rmpv::decode::read_value(&mut &self.body[..]).map(|v| value_to_json(&v)).unwrap_or_default()
        };
        let mut out = serde_json::Map::new();
        for part in ["input", "params"] {
            if let Some(fields) = job.get(part).and_then(|v| v.as_object()) {
                out.extend(fields.clone());
            }
        }
        serde_json::Value::Object(out)
    }
}

fn map(fields: Vec<(&str, Value)>) -> Value {
    Value::Map(fields.into_iter().map(|(k, v)| (Value::from(k), v)).collect())
}

fn encode(v: &Value, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::MsgPack => {
            let mut out = Vec::new();
            rmpv::encode::write_value(&mut out, v).expect("writing to a Vec cannot fail");
            out
        }
        Encoding::Json => serde_json::to_vec(&value_to_json(v)).expect("plain values serialize"),
    }
}

fn value_to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Map(m) => serde_json::Value::Object(m.iter().map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), value_to_json(v))).collect()),
        Value::Array(a) => serde_json::Value::Array(a.iter().map(value_to_json).collect()),
        Value::String(s) => s.as_str().unwrap_or_default().into(),
        Value::Boolean(b) => (*b).into(),
        Value::F32(f) => (*f as f64).into(),
        Value::F64(f) => (*f).into(),
        Value::Integer(i) => i.as_i64().map_or_else(|| i.as_u64().into(), Into::into),
        _ => serde_json::Value::Null,
    }
}

fn json_to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => (*b).into(),
        serde_json::Value::Number(n) => n.as_i64().map(Value::from).or(n.as_u64().map(Value::from)).unwrap_or_else(|| n.as_f64().unwrap_or(0.0).into()),
        serde_json::Value::String(s) => s.as_str().into(),
        serde_json::Value::Array(a) => Value::Array(a.iter().map(json_to_value).collect()),
        serde_json::Value::Object(o) => Value::Map(o.iter().map(|(k, v)| (k.as_str().into(), json_to_value(v))).collect()),
    }
}

/// A tensor of `shape` with values in [-1, 1): msgpack carries the little-endian bytes, JSON a list.
fn tensor(dtype: &str, shape: &[u64], rng: &mut Rng, encoding: Encoding) -> Value {
    let numel: u64 = shape.iter().product();
    let values: Vec<f64> = (0..numel).map(|_| rng.unit() * 2.0 - 1.0).collect();
    let integral = |x: f64| (x * 100.0).round() as i64;
    let data = match encoding {
        Encoding::MsgPack => Value::Binary(match dtype {
            "f64" => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            "i64" => values.iter().flat_map(|&x| integral(x).to_le_bytes()).collect(),
            "i32" => values.iter().flat_map(|&x| (integral(x) as i32).to_le_bytes()).collect(),
            _ => values.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
        }),
        Encoding::Json => Value::Array(match dtype {
            "i64" | "i32" => values.iter().map(|&x| integral(x).into()).collect(),
            _ => values.iter().map(|&x| ((x * 1e4).round() / 1e4).into()).collect(),
        }),
    };
    map(vec![
        ("dtype", dtype.into()),
        ("shape", Value::Array(shape.iter().map(|&n| n.into()).collect())),
        ("data", data),
    ])
}

const WORDS: [&str; 32] = [
    "the", "model", "batch", "stream", "token", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "result", "worker",
    "queue", "answer", "light", "river", "stone", "paper", "green", "seven", "north", "signal", "garden", "winter", "copper",
    "silent", "market", "window", "bridge", "number",
];

fn text(words: u64, rng: &mut Rng) -> String {
    (0..words.max(1)).map(|_| WORDS[rng.below(WORDS.len() as u64) as usize]).collect::<Vec<_>>().join(" ")
}

/// SplitMix64: small, fast, and the same sequence on every platform for a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.unit()).cos()
    }

    /// Exponential with mean `mean` (Poisson inter-arrival times).
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -(1.0 - self.unit()).ln() * mean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(toml: &str) -> Result<Workload, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(&path, toml).unwrap();
        Workload::load(&path)
    }

    #[test]
    fn mix_weights_sizes_and_duplicates_follow_the_file() {
        let w = workload(
            "duplicate_ratio = 0.5\n[[mix]]\nmodel = \"a\"\nkind = \"tensor\"\nweight = 3\nshape = [{ uniform = [2, 4] }, 8]\n\
             [[mix]]\nmodel = \"b\"\nkind = \"generate\"\nprompt_words = 3\nmax_new_tokens = { choice = [5, 9] }\nparams = { temperature = 0.0 }\n",
        )
        .unwrap();
        let mut g = Generator::new(w);
        let (mut a, mut bodies) = (0, std::collections::HashSet::new());
        for i in 0..4000 {
            let job = g.next(format!("j{i}"));
            let v: Value = rmpv::decode::read_value(&mut &job.body[..]).unwrap();
            let field = |v: &Value, k: &str| v.as_map().unwrap().iter().find(|(key, _)| key.as_str() == Some(k)).map(|(_, v)| v.clone()).unwrap();
            assert_eq!(field(&v, "id").as_str(), Some(format!("j{i}").as_str()));
            let input = field(&v, "input");
            if job.model == "a" {
                a += 1;
                let inputs = field(&input, "inputs");
                let t = &inputs.as_array().unwrap()[0];
                let rows = field(t, "shape").as_array().unwrap()[0].as_u64().unwrap();
                assert!((2..=4).contains(&rows));
                assert_eq!(field(t, "data").as_slice().unwrap().len() as u64, rows * 8 * 4);
            } else {
                let n = field(&field(&v, "params"), "max_new_tokens").as_u64().unwrap();
                assert!(n == 5 || n == 9);
                assert_eq!(field(&input, "prompt").as_str().unwrap().split(' ').count(), 3);
            }
            bodies.insert(rmp_serde::to_vec(&input).unwrap());
        }
        // 3:1 mix, and about half of the jobs repeat an earlier input.
        assert!((2800..3200).contains(&a), "{a} of 4000 jobs were model a");
        assert!((1800..2200).contains(&bodies.len()), "{} distinct inputs in 4000 jobs", bodies.len());
    }

    #[test]
    fn multiple_choice_options_come_in_a_row_with_one_context() {
        let w = workload("[[mix]]\nmodel = \"lm\"\nkind = \"loglikelihood\"\ncontext_words = 8\ncontinuation_words = 3\nchoices = 4\n").unwrap();
        let mut g = Generator::new(w);
        let jobs: Vec<serde_json::Value> = (0..12).map(|i| g.next(format!("j{i}")).input_and_params()).collect();
        for question in jobs.chunks(4) {
            let contexts: std::collections::HashSet<_> = question.iter().map(|j| j["context"].as_str().unwrap().to_string()).collect();
            assert_eq!(contexts.len(), 1, "one context per question: {question:?}");
            let options: std::collections::HashSet<_> = question.iter().map(|j| j["continuation"].as_str().unwrap().to_string()).collect();
            assert!(options.len() >= 3, "options are drawn apart: {question:?}");
            assert_eq!(question[0]["context"].as_str().unwrap().split(' ').count(), 8);
        }
        assert_ne!(jobs[0]["context"], jobs[4]["context"], "each question its own context");
        let e = workload("[[mix]]\nmodel = \"a\"\nkind = \"loglikelihood\"\ncontext_words = 3\ncontinuation_words = 1\nchoices = 0\n").unwrap_err();
        assert!(e.contains("mix[0].choices: must be at least 1"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let e = workload("[[mix]]\nmodel = \"a\"\nkind = \"tensor\"\n").unwrap_err();
        assert!(e.contains("mix[0].shape: required"), "{e}");
        let e = workload("[[mix]]\nmodel = \"a\"\nkind = \"loglikelihood\"\ncontext_words = 3\n").unwrap_err();
        assert!(e.contains("mix[0].continuation_words"), "{e}");
        let e = workload("[[mix]]\nmodel = \"a\"\nkind = \"nope\"\n").unwrap_err();
        assert!(e.contains("mix[0].kind: unknown kind 'nope'"), "{e}");
        let e = workload("duplicate_ratio = 2.0\n[[mix]]\nmodel = \"a\"\nkind = \"embed\"\ntext_words = 3\n").unwrap_err();
        assert!(e.contains("duplicate_ratio"), "{e}");
        let e = workload("[[mix]]\nmodel = \"a\"\nkind = \"embed\"\ntext_words = { uniform = [5, 2] }\n").unwrap_err();
        assert!(e.contains("text_words: uniform [5, 2] has lo > hi"), "{e}");
    }

    #[test]
    fn poisson_gaps_have_the_asked_mean() {
        let mut rng = Rng::new(3);
        let n = 100_000;
        let mean = (0..n).map(|_| rng.exponential(2.0)).sum::<f64>() / n as f64;
        assert!((mean - 2.0).abs() < 0.05, "mean gap {mean}");
    }
}
