"""Every method's recipe parameters, one module per method (as methods/), plus what several share (base,
structured, and gptq's grid). These modules import pydantic and each other, never a method implementation,
the recipe, the plan or torch: the recipe validates through them without loading any method."""
