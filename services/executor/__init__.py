"""The executor: the resident backbone serving continuous batches that mix LoRA adapters
(installed as mintmesh.services.executor).

- config.py: ExecutorConfig, the one frozen configuration;
- lora.py: the multi-LoRA layer wrapped around each targeted Linear;
- kv.py: the paged KV cache (fixed-size blocks, block tables) and the paged attention function
  registered in transformers' AttentionInterface;
- sequence.py: sequences and the tenant-fair waiting queue (virtual token counters);
- batch_state.py: what the parts of the step loop share, given to each at construction: the
  running list, the waiting queues and counters, the state lock (BatchState), the limits
  (StepLimits);
- intake.py: prompts from text and chats, submit()'s validation and queue limits, the inbox,
  the sequences waiting for their adapter's load;
- kv_manager.py: owns the KV blocks: block tables, block acquire/release and prefix caching
  over the paged KV cache;
- scheduler.py: decides admission: budgets, tenant fairness and preemption, each step's
  StepPlan;
- runner.py: the ModelRunner interface (runs the model: a ForwardBatch in, logits out; adapter
  load/evict, AdapterDevice) and the packing of a step's schedule or of Forward's rows into a
  ForwardBatch;
- torch_runner.py: TorchModelRunner, the HF backbone with multi-LoRA layers and paged attention;
- sampling.py: per-request sampling options, token choice, incremental text with stop strings;
- output.py: OutputProcessor, each step's sampling, streaming, slow readers, finishing and
  retiring of sequences;
- step_loop.py: one iteration over the parts (intake, scheduling, one forward, sampling) and
  the step thread;
- sources.py: the AdapterSource interface (where adapter bytes come from), NoSource and the
  in-process PackedBytesSource;
- grpc_source.py: SidecarSource, the node cache sidecar's source (the one that speaks gRPC;
  the server wires it in);
- residency.py: the host tier, the device pool with references (loading through the runner),
  each digest's AdapterState, the background adapter loader;
- timeshare.py: the training queue on the same resident model, time-sliced with serving;
- stats.py: the step log and the Status snapshot;
- engine.py: the core (plain Python/torch): wires the parts; the public API (submit, Forward,
  prefetch, purge, status, training, close);
- servicer.py / server.py: the mintmesh.v1.Executor gRPC service over the engine.
"""

from mintmesh.services.executor.config import ExecutorConfig

__all__ = ["ExecutorConfig"]
