//! What `submit` and `cancel` fail with, each said in one line to the producer.

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    #[error("nats: {0}")]
    Nats(String),
    #[error("no result for {missing} job(s) after waiting {secs} s without progress")]
    Incomplete { missing: usize, secs: u64 },
    #[error("{n} job(s) not queued and not answered: their ids were used by other jobs within the jobs stream's duplicate window ({ids}); give them new ids")]
    Duplicates { n: usize, ids: String },
    #[error("{0} job(s) answered with an error; pass --allow-errors to exit 0 anyway")]
    JobsFailed(usize),
    #[error("interrupted: {written} result(s) written; {queued} job(s) stay queued and are still computed — run the same command again to collect their results, or `jetbatch cancel` with the same input to drop them{}", unsure_note(*.unsure))]
    Interrupted { written: usize, queued: usize, unsure: usize },
}

impl SubmitError {
    /// The exit status: 130 for an interrupt (as shells report Ctrl-C), else 1.
    pub fn exit_code(&self) -> u8 {
        if matches!(self, SubmitError::Interrupted { .. }) { 130 } else { 1 }
    }
}

/// The Ctrl-C message's word on duplicates that this account could not look up in the queue.
fn unsure_note(unsure: usize) -> String {
    if unsure == 0 {
        return String::new();
    }
    format!("; {unsure} more were dropped as duplicates of jobs published earlier under their ids, which this account cannot look up in the queue")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupt_mentions_unverified_duplicates_only_when_there_are_some() {
        let said = |unsure| SubmitError::Interrupted { written: 3, queued: 4, unsure }.to_string();
        assert!(said(0).starts_with("interrupted: 3 result(s) written; 4 job(s) stay queued") && said(0).ends_with("to drop them"), "{}", said(0));
        assert!(said(2).ends_with("to drop them; 2 more were dropped as duplicates of jobs published earlier under their ids, which this account cannot look up in the queue"), "{}", said(2));
    }
}
