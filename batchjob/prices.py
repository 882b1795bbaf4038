"""What a job cost: machine time × an hourly price, per million documents and per million tokens.

The price is the user's (`--price-per-hour USD`, per machine: their discount, spot or region),
or an instance type's On-Demand price from the small table below, which is dated and says
where each figure comes from. A figure that could not be checked against a published source
is left out rather than guessed: give `--price-per-hour` for those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from batchjob.errors import UsageError

PRICES_REGION = "us-east-1"
PRICES_DATE = "2026-12-02"  # when the figures below were read
# USD per hour, On-Demand, Linux. Source: the AWS Neuron documentation's cost-per-1M-
# inferences tables, github.com/aws-neuron/aws-neuron-sdk,
# general/benchmarks/inf2/inf2_instance_prices.csv ("On-Demand hourly rate").
# inf1, trn1 and CPU instance figures: no published source could be checked offline; left out.
ON_DEMAND_USD_PER_HOUR: dict[str, float] = {
    "inf2.xlarge": 0.758,
    "inf2.8xlarge": 1.97,
    "inf2.24xlarge": 6.49,
    "inf2.48xlarge": 12.981,
}


def hourly_price(price_per_hour: float | None, instance_type: str | None) -> float | None:
    """The USD per machine-hour the flags give; None when neither is given. UsageError for a
    price ≤ 0, both flags at once, or an instance type the table doesn't hold."""
    if price_per_hour is not None and instance_type is not None:
        raise UsageError("--price-per-hour and --instance-type exclude each other")
    if price_per_hour is not None:
        if not 0 < price_per_hour < math.inf:
            raise UsageError(
                f"--price-per-hour must be a number > 0 (USD per machine-hour), got "
                f"{price_per_hour:g}"
            )
        return float(price_per_hour)
    if instance_type is None:
        return None
    if instance_type not in ON_DEMAND_USD_PER_HOUR:
        known = ", ".join(ON_DEMAND_USD_PER_HOUR)
        raise UsageError(
            f"--instance-type {instance_type}: no price known (known: {known}; "
            f"{PRICES_REGION} On-Demand, {PRICES_DATE}); give --price-per-hour USD instead"
        )
    return ON_DEMAND_USD_PER_HOUR[instance_type]


@dataclass(frozen=True, slots=True)
class Cost:
    usd: float
    per_million_documents: float | None  # None: no documents
    per_million_tokens: float | None  # None: no tokens counted

    def describe(self) -> dict[str, Any]:
        return {
            "usd": round(self.usd, 6),
            "usd_per_million_documents": _rounded(self.per_million_documents),
            "usd_per_million_tokens": _rounded(self.per_million_tokens),
        }

    def line(self) -> str:
        parts = [f"cost ${self.usd:.4f}"]
        if self.per_million_documents is not None:
            parts.append(f"${self.per_million_documents:.4f} per million documents")
        if self.per_million_tokens is not None:
            parts.append(f"${self.per_million_tokens:.4f} per million tokens")
        return ", ".join(parts)


def cost(price_per_hour: float, machine_seconds: float, documents: int, tokens: int) -> Cost:
    """Machine time at `price_per_hour`, and what it came to per million documents and tokens."""
    usd = price_per_hour * machine_seconds / 3600
    return Cost(
        usd,
        usd / documents * 1e6 if documents else None,
        usd / tokens * 1e6 if tokens else None,
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
