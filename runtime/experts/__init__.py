"""The expert room: where routed experts live and how they run. It knows nothing of graphs or
tokens; the forward pass (runtime.model) hands it one `LayerOutputs` a layer (`store.after_layer`).

    store.py       ExpertStore, the per-layer hand-off; ResidentExperts (every expert in memory)
    offload.py     OffloadedExperts: glue of the plan, the predictors, residency and the executors
    plan.py        budget -> RunPlan, a pure function of the artifact and the options
    allocation.py  slots per layer from the profile's miss curves (shared with the compiler)
    predictors.py  the predictors of a layer's experts (shared with the profiler)
    gates.py       whether a layer's decode prefetch pays (reads mostly used, waits longer than the loop's work)
    residency.py   ExpertCache: which expert is in which slot, pins, eviction groups, loads in flight
    eviction.py    ARC, LFRU, S3-FIFO, LRU over opaque keys (shared with the profiler)
    loads.py       one expert's load: a positioned read into a slot, its SHA-256 checked once
    pool.py        the slot pool: memory allocated once, O_DIRECT reads
    executors.py   native and onnxruntime-session executors over loaded bytes
    report.py      what a run reports about its experts, typed
    replay.py      every policy and Belady's MIN over a routing trace (fate-replay, the profiler)
    trace.py       routing traces (fate-run --trace)
"""
