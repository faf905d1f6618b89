"""The inference engine: sequences, KV blocks, the scheduler (plain Python), the runner, the sampler, and the
sync/async engines every front end calls. Imports the rooms below it; never a front end."""
