# Two commands on a fresh machine: `make serve` and `make test`.
.PHONY: setup serve test check fmt
setup:
	@bash deploy/setup.sh
serve: setup
	.venv/bin/tokenweir serve $(if $(CONFIG),--config $(CONFIG),)
test: setup
	@bash deploy/check.sh
fmt: setup
	.venv/bin/ruff format serving models loadtests tests
	.venv/bin/ruff check --fix serving models loadtests tests
