"""Runtime: what every layer above stands on and nothing of the method. Flags and their checks
(config), the workdir's layout and results (workdir), whole-file writes and locks (files),
signals as requests (signals), the progress line (progress), devices and strategies
(distribute). Imports nothing of clae_tf but ClaeError; config, files, signals, progress and
workdir import no TensorFlow (run.py reads flags before TensorFlow starts)."""
