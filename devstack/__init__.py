"""Engine of `durachat dev`, `durachat services` and the test fixtures: embedded services, the service stack, the process supervisor; never imports api, workflows or activities."""
