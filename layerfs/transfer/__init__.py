"""Moving images: pull, push, local transports, eStargz, published layer indexes."""
