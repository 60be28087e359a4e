"""The one error type of conversion: the message says what is wrong and what to do."""


class ConvertError(ValueError):
    pass
