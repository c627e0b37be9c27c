"""Run folders: the one place that knows their layout (docs/architecture.md, "Run directory").

Below training, inference, evaluation, export and the web UI; imports only config, errors and models.

- `rundir`: layout constants, `RunDir` (paths and atomic writers), choosing a new run or the one to resume.
- `artifacts`: a run folder, adapter, exported or plain model folder -> what inference loads (`Artifact`).
- `read`: typed readers (`RunInfo` = run.json), listing and comparing runs.
"""
