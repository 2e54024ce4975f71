mkdir -p private empty/nested shared
echo secret > private/key; chmod 0600 private/key; chmod 0700 private
echo run > script.sh; chmod 0755 script.sh
echo ro > readonly; chmod 0444 readonly
echo g > shared/g; chmod 2775 shared; chmod 0664 shared/g
chmod 1777 empty
chown 1234:5678 script.sh
