"""Running a job, the top layer: run.py's phases (app: train, eval, export), the train loop
around the CLAE step (train) and its health checks (health), the train state and its
checkpoints (checkpoints), and the exports (export, portable). May import every layer below."""
