"""The detector a run's config selects: `validate_monitor` checks the `monitor*` fields against the environment,
`build_detector` composes the detector's noise (`route.monitors.detectors`) with the monitor's blindness
(`route.monitors.systematic`, `route.monitors.classifier`) and the flag control."""

from __future__ import annotations

from typing import Any

from route.monitors.detectors import MONITORS, ControlDetector, Detector, make_detector, parse_json


def validate_monitor(config: Any, env: Any) -> None:
    """Check the `monitor*` fields of a RoutedGRPOConfig against the environment; normalises them in place.

    Raises ValueError naming the field and the allowed values.
    """
    if config.monitor not in MONITORS:
        raise ValueError(f"monitor: invalid value {config.monitor!r}; allowed values: {list(MONITORS)}")
    if config.monitor in ("prompt", "prompt_form", "prompt_judge"):
        column = config.monitor_column or getattr(env, "detect_column", None)
        if column is None:
            raise ValueError(f"monitor_column: env {env.name!r} has no detectability column; name a boolean "
                             f"dataset column, or use monitor: plain/form")
        config.monitor_column = column
    forms = parse_json("monitor_forms", config.monitor_forms)
    if forms is not None and (not isinstance(forms, dict) or not all(isinstance(v, str) for v in forms.values())):
        raise ValueError(f"monitor_forms: must map mode -> regular expression, got {forms!r}")
    if config.monitor in ("form", "prompt_form") and forms is None:
        forms = getattr(env, "monitor_patterns", None)
        if forms is None:
            raise ValueError(f"monitor_forms: env {env.name!r} has no default form patterns; give a mapping "
                             f"mode -> regular expression")
    if forms is not None:
        from route.monitors.systematic import FormDetector

        unknown = [m for m in forms if m not in env.modes]
        if unknown:
            raise ValueError(f"monitor_forms: unknown modes {unknown}; allowed values: {list(env.modes)}")
        FormDetector(forms)  # compiles every pattern: a bad one fails here
    config.monitor_forms = forms
    if config.monitor == "classifier":
        from route.monitors.classifier import validate_classifier

        validate_classifier(config, env)
    if config.monitor in JUDGES:
        validate_judge(config, env)


JUDGES = ("judge", "prompt_judge")


def validate_judge(config: Any, env: Any) -> None:
    """Check the `monitor_judge_*` fields; the question defaults to the environment's `judge_question`."""
    from route.monitors.judge import DEFAULT_QUESTION

    if config.monitor_judge_model is None and config.model_name_or_path is None:
        raise ValueError("monitor_judge_model: the judge needs a causal LM (a checkpoint or a short name such as "
                         "smollm2-135m-instruct); the run's model is the built-in organism, so name one")
    config.monitor_judge_question = config.monitor_judge_question or getattr(env, "judge_question", DEFAULT_QUESTION)
    if not isinstance(config.monitor_judge_question, str) or not config.monitor_judge_question.strip():
        raise ValueError(f"monitor_judge_question: must be a non-empty string, got {config.monitor_judge_question!r}")
    if not isinstance(config.monitor_judge_threshold, (int, float)) or isinstance(config.monitor_judge_threshold, bool):
        raise ValueError(f"monitor_judge_threshold: must be a number, got {config.monitor_judge_threshold!r}")
    if not isinstance(config.monitor_judge_batch_size, int) or config.monitor_judge_batch_size < 1:
        raise ValueError(f"monitor_judge_batch_size: must be an int >= 1, got {config.monitor_judge_batch_size!r}")


def build_detector(config: Any, env: Any) -> Detector:
    """The detector a RoutedGRPOConfig selects: `detector` (noise) composed with the `monitor` blindness, wrapped
    in a `ControlDetector` when `flag_control` is random or never.

    plain: `make_detector`. prompt: that detector, blind to exploits off `monitor_column`. form: a
    `FormDetector` over `monitor_forms` with `detector_tpr` / `detector_fpr` as its noise. prompt_form:
    the form detector, also blind off the column. classifier: `route.monitors.classifier`. judge: a frozen causal LM
    (`route.monitors.judge`, its own noise); prompt_judge: the judge reading only the rollouts on `monitor_column`.
    """
    validate_monitor(config, env)
    monitor = _build_monitor(config, env)
    control = getattr(config, "flag_control", "none")
    return monitor if control == "none" else ControlDetector(monitor, control, config.detector_seed)


def _build_monitor(config: Any, env: Any) -> Detector:
    from route.monitors.systematic import FormDetector, PromptConditionalDetector

    kind = config.monitor
    if kind in JUDGES:
        from route.monitors.judge import JudgeDetector

        path = config.monitor_judge_path or config.monitor_judge_model or config.model_name_or_path
        return JudgeDetector(path, config.monitor_judge_question, config.monitor_judge_threshold,
                             config.monitor_judge_batch_size, column=config.monitor_column if kind == "prompt_judge"
                             else None, seed=config.detector_seed)
    if kind == "classifier":
        from route.monitors.classifier import fit_classifier_detector

        return fit_classifier_detector(config, env)
    if kind in ("form", "prompt_form"):
        inner: Detector = FormDetector(config.monitor_forms, config.detector_tpr, config.detector_fpr,
                                       config.detector_seed)
    else:
        inner = make_detector(config.detector, config.detector_tpr, config.detector_fpr, config.detector_seed,
                              config.detector_modes)
    return PromptConditionalDetector(inner, config.monitor_column) if kind.startswith("prompt") else inner


__all__ = ["JUDGES", "build_detector", "validate_judge", "validate_monitor"]
