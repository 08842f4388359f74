"""Imports every built-in family adapter so that they register themselves."""

from accel.pipelines import cogvideox, flux, hunyuan_video, ltx, sd3, wan  # noqa: F401
