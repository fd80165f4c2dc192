"""Label conventions shared by every data source and the loss."""

IGNORE_INDEX = -100  # a label that contributes no loss (prompt tokens, padding); torch's default ignore_index
