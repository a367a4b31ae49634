"""Teacher-forcing probability schedules (scheduled sampling, Bengio et al. 2015)."""

from captioning.schedules.schedules import (
    GRANULARITIES,
    MODES,
    SAMPLING_OPTION_KEYS,
    SCHEDULE_NAMES,
    SCHEDULE_PARAM_KEYS,
    TOKEN_SOURCES,
    UNITS,
    TeacherForcingSchedule,
    build_schedule,
    build_schedule_from_config,
    config_keys,
    sampling_options_from_config,
    schedule_values,
    validate_sampling_options,
    validate_schedule_params,
)

__all__ = [
    "GRANULARITIES",
    "MODES",
    "SAMPLING_OPTION_KEYS",
    "SCHEDULE_NAMES",
    "SCHEDULE_PARAM_KEYS",
    "TOKEN_SOURCES",
    "UNITS",
    "TeacherForcingSchedule",
    "build_schedule",
    "build_schedule_from_config",
    "config_keys",
    "sampling_options_from_config",
    "schedule_values",
    "validate_sampling_options",
    "validate_schedule_params",
]
