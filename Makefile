# rewardopt — the two first commands of the README work on a fresh clone:
#   make demo   fine-tune the embedded tiny text-to-image model (DRaFT-LV), print before/after reward
#   make test   `ruff check`, then the default test suite (< 10 minutes on 2 CPU cores)
# Both create .venv and install pinned versions (constraints.txt) when missing.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo lint test test-all bench install clean pretrain-tiny tts-assets browser-deps

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1
	$(PY) -m pip install -q -c constraints.txt -e ".[images,molecules,dna,tts,qa,web,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rewardopt fit --config recipes/images/draft_lv_tiny.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

test-all: $(STAMP) browser-deps
	$(PY) -m pytest -q -m "slow or not slow"

# Headless Chromium and its WebDriver for tests/feedback/test_browser.py (Debian/Ubuntu, as root; the test skips
# without them).
browser-deps:
	command -v chromedriver >/dev/null && (command -v chromium || command -v chromium-browser) >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

bench: $(STAMP)
	$(PY) benchmarks/backprop_memory.py
	$(PY) benchmarks/sample_efficiency.py
	$(PY) benchmarks/vard.py
	$(PY) benchmarks/inference_time.py --reward jpeg
	$(PY) benchmarks/inference_time.py --reward colour --skip-judge
	$(PY) benchmarks/discrete.py
	$(PY) benchmarks/tts.py
	$(PY) benchmarks/qa.py
	$(PY) benchmarks/video.py
	$(PY) benchmarks/superres.py
	$(PY) benchmarks/text_to_3d.py
	$(PY) benchmarks/dp_bandit.py
	$(PY) benchmarks/flow.py

# Regenerate the shipped tiny weights (domains/*/assets/) from their recipes.
pretrain-tiny: $(STAMP)
	$(VENV)/bin/rewardopt fit --config recipes/images/pretrain_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/images/pretrain_tiny_flow.yaml
	$(VENV)/bin/rewardopt fit --config recipes/images/train_classifier_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/images/train_classifier_hackable_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/molecules/pretrain_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/molecules/train_surrogate_qed_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/molecules/train_surrogate_sa_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/dna/pretrain_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/qa_text/pretrain_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/video/pretrain_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/video/train_judge_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/video/train_motion_classifier_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/video/train_evaluator_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/super_resolution/pretrain_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/super_resolution/train_oracle_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/super_resolution/train_checker_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/super_resolution/train_lr_classifier_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/super_resolution/train_features_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/text_to_3d/pretrain_prior_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/text_to_3d/train_alignment_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/text_to_3d/train_evaluator_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/text_to_3d/train_features_tiny.yaml

# The TTS corpus is spoken by espeak-ng (installed here if missing, on Debian/Ubuntu as root).
tts-assets: $(STAMP)
	command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng)
	$(PY) -m domains.tts.data
	$(VENV)/bin/rewardopt fit --config recipes/tts/pretrain_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/tts/train_token_model_tiny.yaml
	$(VENV)/bin/rewardopt fit --config recipes/tts/train_recogniser_tiny.yaml

clean:
	rm -rf $(VENV) runs lightning_logs
