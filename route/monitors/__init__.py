"""Monitors: what flags a rollout. The `Detector` protocol and coin-flip detectors (`detectors`), monitors blind in
a systematic way (`systematic`: prompt-conditional, form programs), a small trained classifier (`classifier`), and
the detector a config selects (`build`). May import route.utils and route.masks (and envs); nothing above."""
