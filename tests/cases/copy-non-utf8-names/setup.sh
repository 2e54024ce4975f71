mkdir d
echo latin1 > "d/$(printf 'caf\351')"
echo ctrl > "d/$(printf 'tab\there')"
echo nl > "d/$(printf 'new\nline')"
