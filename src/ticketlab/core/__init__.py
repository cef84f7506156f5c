"""What a ticket is: masks, pruning, mask criteria, resets."""
