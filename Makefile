# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)

.PHONY: install run test bench bench-methods clean

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

# Web (Streamlit on :8501) and the worker, from the Procfile, through honcho.
run: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/honcho start

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/end_to_end.py
	$(PY) bench/methods.py
	$(PY) bench/catalog.py          # the whole catalog on MiniLM, one run (about 30 min on 2 cores)

bench-methods: install               # each family in depth (each 5-25 min on 2 cores)
	$(PY) bench/structured.py
	$(PY) bench/quantize.py
	$(PY) bench/lowrank_cluster.py
	$(PY) bench/albert_vocab.py
	$(PY) bench/distill.py
	$(PY) bench/recovery.py            # recovery objectives at 90% sparsity, structured + distill, train large then compress
	$(PY) bench/once_for_all.py        # once-for-all vs fixed-rate speech models, 3 seeds (about 45 min)
	$(PY) bench/learned_rate.py        # a learned pooling rate against a grid (uses once_for_all's seed-0 model)
	$(PY) bench/token_merge.py         # token merging on MiniLM at every rate, timed together
	$(PY) bench/search.py              # the rate search against a 20-point grid (digits-cnn, MiniLM)

clean:
	rm -rf $(VENV) .pytest_cache
