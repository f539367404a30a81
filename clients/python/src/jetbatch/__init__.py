"""Python client for jetbatch: ML jobs over NATS JetStream (see clients/python/README.md).

`jetbatch.lm_eval` is the lm-evaluation-harness backend (imported on its own: it needs lm-eval).
"""
from .client import Client, JetbatchDuplicateIds, JetbatchError, SyncClient, Topology, derive_id, job_hash, run, split_servers
from .types import (
    ChatPrompt,
    ChoicesOutput,
    ClassifyOutput,
    EmbedOutput,
    GenerateOutput,
    JetbatchTimeout,
    Job,
    JobError,
    LoglikelihoodOutput,
    Provenance,
    Result,
    StreamChunk,
    RollingOutput,
    Tensor,
    TensorOutput,
    Timing,
    TopLogprobs,
)

__all__ = [
    "Client", "SyncClient", "run", "Topology", "JetbatchError", "JetbatchDuplicateIds", "JetbatchTimeout", "Job", "JobError", "Result",
    "Timing", "LoglikelihoodOutput", "ChoicesOutput", "TopLogprobs", "StreamChunk", "Provenance", "ChatPrompt", "RollingOutput", "GenerateOutput", "EmbedOutput", "ClassifyOutput", "Tensor",
    "TensorOutput", "derive_id", "job_hash", "split_servers",
]
