"""Pipeline steps: one module per DVC stage (`python -m tasks.<step>`), each with a function that
does the work on typed config and a `main` that DVC calls. Stage modules stand on one level: they
share code through `tasks.core`, `tasks.data` and `tasks.evaluation`, never through each other, and
import nothing from Prefect (flows/ runs them through `dvc repro`)."""
