"""Training: the one door to Accelerate and DeepSpeed (``engine``), the model's assembly from a config, the recipe
(setup / train_step / validate / save / finish), its schedule, checkpoints, guards, pre-flight checks, run-folder
files and the memory planner's arithmetic. Imports the core, ``data`` and ``evaluation``."""
