//! The job kinds of the contract, as a plain name: it imports nothing, so the rooms below the
//! kinds (the engine's architecture table, which says what each architecture serves; a model's
//! plan) can name a kind without reaching up into the kinds' parsing. What each kind reads and
//! how it batches is the table in [`super`] (`impl JobKind`).

use serde::{Deserialize, Serialize};

/// Job kinds of the contract. The engine's backends say which they serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Tensor,
    Generate,
    Loglikelihood,
    LoglikelihoodRolling,
    Embed,
    Classify,
}
