"""Circuit-aware red teaming: searches for inputs that engage, suppress or evade a circuit
family's monitor, and reports in the formats red teams use."""
